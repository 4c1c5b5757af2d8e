"""Kafka's jars from Maven Central, resolved once into the devstack cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from devstack.paths import cache_dir
from devstack.process import ServiceError

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
# Kafka 4.1 is built against this log4j2; its binary distribution ships the same.
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.17"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"

# kafka_2.13 brings the broker, controller and StorageTool. The log4j2 binding is
# added by hand: the artifact only depends on the slf4j API, so without it the
# broker would log nothing. Its pom asks for slf4j-api 1.7, which cannot see an
# slf4j2 binding; the direct 2.x dependency wins over it.
_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>devstack</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version>
      <scope>runtime</scope>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
      <scope>runtime</scope>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version>
      <scope>runtime</scope>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{plugin}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""

def kafka_home(version: str = KAFKA_VERSION) -> Path:
    """Cache directory holding ``libs/`` for one Kafka version."""
    return cache_dir() / "kafka" / version


def kafka_libs(version: str = KAFKA_VERSION) -> Path:
    return kafka_home(version) / "libs"


def fetch_kafka(version: str = KAFKA_VERSION, *, force: bool = False) -> Path:
    """Resolve Kafka and its runtime dependencies with Maven into the cache; return the libs dir.

    Idempotent: a complete libs dir (marked by ``.complete``) is reused unless
    ``force``. Jars land in a scratch dir first and are renamed into place, so an
    interrupted fetch never leaves a half-filled libs dir behind.
    """
    home = kafka_home(version)
    libs = home / "libs"
    marker = libs / ".complete"
    if marker.exists() and not force:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (mvn) is not on PATH; install it (Debian: apt-get install maven)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(
        _POM.format(
            kafka=version,
            scala=SCALA_VERSION,
            log4j=LOG4J_VERSION,
            slf4j=SLF4J_VERSION,
            plugin=DEPENDENCY_PLUGIN_VERSION,
        )
    )
    # A scratch dir of our own: concurrent fetches must not fill the same one.
    scratch = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=home))
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(home / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={scratch}",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not any(scratch.glob(f"kafka_{SCALA_VERSION}-{version}.jar")):
        shutil.rmtree(scratch, ignore_errors=True)
        raise ServiceError(
            f"mvn could not resolve org.apache.kafka:kafka_{SCALA_VERSION}:{version} "
            f"(exit {result.returncode})\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    (scratch / ".complete").write_text(version + "\n")
    # Archived classes are checked against the jars' mtimes; new jars void them.
    for stale in [*home.glob("kafka-cds-*.jsa"), *home.glob("kafka-cds-*.failed")]:
        stale.unlink(missing_ok=True)
    if force or not marker.exists():  # replaced, or left incomplete by an interrupted fetch
        shutil.rmtree(libs, ignore_errors=True)
    try:
        scratch.rename(libs)
    except OSError:  # another fetch finished first; its jars are the same
        shutil.rmtree(scratch, ignore_errors=True)
    return libs


def java_binary() -> str:
    """Path of ``java``; raises :class:`ServiceError` when no JRE is installed."""
    java = shutil.which("java")
    if java is None:
        raise ServiceError("java is not on PATH; install a JRE 17+ (Debian: apt-get install default-jre-headless)")
    return java


def class_archive(version: str = KAFKA_VERSION) -> Path:
    """Where the class-data-sharing archive for this Kafka and this JVM lives.

    A dynamic CDS archive is valid only for the JVM build that wrote it, so the
    file name carries a digest of the java binary's real path and mtime.
    """
    java = Path(os.path.realpath(java_binary()))
    digest = hashlib.sha256(f"{java}:{java.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    return kafka_home(version) / f"kafka-cds-{digest}.jsa"
