"""``[[sinks]]`` tables at config load: each validated by its own sink's factory, every
problem one issue naming the file and the key, nothing started."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from iortd.daemon.config import ConfigError, ConfigIssue, load_config
from iortd.daemon.sink_registry import ENTRY_POINT_GROUP, SinkRegistry
from iortd.daemon.sinks import Sink, SinkContext, SinkOptionError, SinkSpec
from iortd.drivers.registry import DriverRegistry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.toml"


class FileSinkFactory:
    name = "file"

    def validate(self, options: Mapping[str, Any]) -> None:
        for key in options:
            if key not in {"path", "fsync"}:
                raise SinkOptionError(f"options.{key}", "unknown key (known: fsync, path)")
        if not isinstance(options.get("path"), str):
            raise SinkOptionError("options.path", "required: a file path")

    def create(self, spec: SinkSpec, context: SinkContext) -> Sink:
        return Sink()


class CrashingFactory:
    name = "crashing"

    def validate(self, options: Mapping[str, Any]) -> None:
        raise KeyError("a plug-in bug")

    def create(self, spec: SinkSpec, context: SinkContext) -> Sink:
        raise AssertionError("never built")


REGISTRY = SinkRegistry.of([FileSinkFactory(), CrashingFactory()])


def config_with(tmp_path: Path, tables: str) -> Path:
    text = DEMO.read_text("utf-8").replace('directory = "', f'directory = "{tmp_path}/', 1)
    path = tmp_path / "site.toml"
    path.write_text(text + "\n" + tables, encoding="utf-8")
    return path


def issues(path: Path, registry: SinkRegistry = REGISTRY) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, DriverRegistry.from_entry_points(), sinks=registry)
    return list(excinfo.value.issues)


def test_a_valid_table_loads_with_its_queue_defaults_and_read_only_options(
    tmp_path: Path,
) -> None:
    path = config_with(tmp_path, '[[sinks]]\ntype = "file"\n[sinks.options]\npath = "/x"\n')
    loaded = load_config(path, DriverRegistry.from_entry_points(), sinks=REGISTRY)
    [s] = loaded.config.sinks
    assert (s.type, s.name, s.queue_size, s.overflow, s.timeout_s) == (
        "file",
        None,
        1000,
        "drop_oldest",
        10.0,
    )
    with pytest.raises(TypeError):
        s.options["path"] = "/elsewhere"  # type: ignore[index]
    # The record of the config in force holds the table as written.
    assert loaded.config.model_dump(mode="json")["sinks"][0]["options"] == {"path": "/x"}


@pytest.mark.parametrize(
    ("tables", "key", "words"),
    [
        (
            '[[sinks]]\ntype = "nope"\n',
            "sinks[0].type",
            ("'nope'", "installed sinks: crashing, file"),
        ),
        (
            '[[sinks]]\ntype = "file"\n[sinks.options]\npath = "/x"\nfsnyc = true\n',
            "sinks[0].options.fsnyc",
            ("unknown key",),
        ),
        ('[[sinks]]\ntype = "file"\n', "sinks[0].options.path", ("required",)),
        ('[[sinks]]\ntype = "file"\nqueue_sise = 5\n', "sinks[0].queue_sise", ("unknown key",)),
        ('[[sinks]]\ntype = "file"\nqueue_size = 0\n', "sinks[0].queue_size", ("greater than",)),
        ('[[sinks]]\ntype = "File"\n', "sinks[0].type", ("sink type as installed",)),
        (
            '[[sinks]]\ntype = "file"\noverflow = "drop_all"\n',
            "sinks[0].overflow",
            ("'drop_oldest' or 'block'",),
        ),
        ('[[sinks]]\ntype = "mqtt"\n', "sinks[0].type", ("[mqtt] table",)),
        (
            '[[sinks]]\ntype = "file"\nname = "oplog"\n[sinks.options]\npath = "/x"\n',
            "sinks[0].name",
            ("built-in",),
        ),
        ('[[sinks]]\ntype = "crashing"\n', "sinks[0].options", ("could not check", "KeyError")),
        (
            '[[sinks]]\ntype = "file"\n[sinks.options]\npath = "/x"\n[sinks.options.auth]\n'
            'token = "s3cret"\n',
            "sinks[0].options.auth.token",
            ("secrets never go in the TOML", "password_file"),
        ),
    ],
)
def test_each_problem_is_one_issue_naming_the_key(
    tmp_path: Path, tables: str, key: str, words: tuple[str, ...]
) -> None:
    [issue] = issues(config_with(tmp_path, tables))
    assert issue.file == tmp_path / "site.toml"
    assert issue.key == key
    for w in words:
        assert w in issue.message, issue.message
    assert "s3cret" not in issue.message


def test_two_sinks_of_one_type_need_names_of_their_own(tmp_path: Path) -> None:
    table = '[[sinks]]\ntype = "file"\n[sinks.options]\npath = "/x"\n'
    [issue] = issues(config_with(tmp_path, table * 2))
    assert issue.key == "sinks[1].type"
    assert "unique" in issue.message
    named = table + table.replace('type = "file"\n', 'type = "file"\nname = "copy"\n')
    load_config(config_with(tmp_path, named), DriverRegistry.from_entry_points(), sinks=REGISTRY)


def test_a_sink_that_fails_to_import_is_not_reported_as_missing(tmp_path: Path) -> None:
    broken = EntryPoint(name="broken", value="no_such_sink_module:F", group=ENTRY_POINT_GROUP)
    [issue] = issues(
        config_with(tmp_path, '[[sinks]]\ntype = "broken"\n'), SinkRegistry({"broken": broken})
    )
    assert issue.key == "sinks[0].type"
    assert "installed but failed to load" in issue.message
    assert "no_such_sink_module" in issue.message


def test_the_number_of_sinks_is_bounded(tmp_path: Path) -> None:
    table = '[[sinks]]\ntype = "file"\n[sinks.options]\npath = "/x"\n'
    [issue] = issues(config_with(tmp_path, table * 17))
    assert issue.key == "sinks"
    assert "at most 16" in issue.message


class PathSinkFactory(FileSinkFactory):
    name = "pathy"
    path_options = frozenset({"path"})


def test_a_factorys_path_options_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    registry = SinkRegistry.of([PathSinkFactory()])
    tables = (
        '[[sinks]]\ntype = "pathy"\nname = "rel"\n[sinks.options]\npath = "out/x.jsonl"\n'
        '[[sinks]]\ntype = "pathy"\nname = "abs"\n[sinks.options]\npath = "/var/x.jsonl"\n'
        '[[sinks]]\ntype = "pathy"\nname = "other"\n[sinks.options]\npath = "/y"\nfsync = "z"\n'
    )
    loaded = load_config(
        config_with(tmp_path, tables), DriverRegistry.from_entry_points(), sinks=registry
    )
    rel, ab, other = loaded.config.sinks
    assert rel.options["path"] == str(tmp_path / "out" / "x.jsonl")
    assert ab.options["path"] == "/var/x.jsonl"
    assert other.options["fsync"] == "z", "only the factory's path options"
