"""Kafka's jars from Maven Central, resolved once into the devstack cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from devstack.kafka_config import DEFAULT_KAFKA_VERSION, kafka_release
from devstack.paths import cache_dir
from devstack.process import ServiceError

KAFKA_VERSION = DEFAULT_KAFKA_VERSION
SCALA_VERSION = "2.13"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"

# kafka_2.13 brings the broker, controller and StorageTool. The logging binding is
# added by hand (see KafkaRelease.logging_artifacts): the artifact only depends on
# the slf4j API, so without it the broker would log nothing.
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
{logging}
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

_DEPENDENCY = """\
    <dependency>
      <groupId>{a.group}</groupId>
      <artifactId>{a.artifact}</artifactId>
      <version>{a.version}</version>
      <scope>runtime</scope>
    </dependency>"""


def runtime_pom(version: str) -> str:
    """The pom whose runtime dependencies are one Kafka version's broker with its logging backend."""
    release = kafka_release(version)
    return _POM.format(
        kafka=version,
        scala=SCALA_VERSION,
        logging="\n".join(_DEPENDENCY.format(a=artifact) for artifact in release.logging_artifacts()),
        plugin=DEPENDENCY_PLUGIN_VERSION,
    )


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
    pom = runtime_pom(version)
    # The marker names the pom the jars were resolved from: a changed pom resolves again.
    stamp = f"{version} {hashlib.sha256(pom.encode()).hexdigest()[:16]}\n"
    if not force and marker.exists() and marker.read_text() == stamp:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (mvn) is not on PATH; install it (Debian: apt-get install maven)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(pom)
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
    (scratch / ".complete").write_text(stamp)
    # Archived classes are checked against the jars' mtimes; new jars void them.
    for stale in [*home.glob("kafka-cds-*.jsa"), *home.glob("kafka-cds-*.failed")]:
        stale.unlink(missing_ok=True)
    if force or not (marker.exists() and marker.read_text() == stamp):
        # Replaced, stale, or left incomplete by an interrupted fetch (not one that another
        # fetch has just completed).
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
