"""Config fuzz: seeded random mutations of every preset (a value of another type, one outside its choices or
range, a misspelt key, a section that is no mapping, a value or document that is no YAML), in the file or
through --set. Each one either loads or gives a one-line ConfigError that names the key (the line, for YAML
that does not parse): never another exception, never a traceback."""
from __future__ import annotations

import dataclasses
import random
import typing
from typing import Any, Literal

import pytest
import yaml

from transrec.config import Config, ConfigError, load_config, preset_names, read_config_text
from transrec.trainer.run_dir import check_model_parts

MUTATIONS_PER_PRESET = 60
# values of another type than each kind of field takes (a str field also takes a bool: YAML's `true`)
WRONG = {
    int: ["three", 2.5, True, [1], {"a": 1}, None],
    float: ["fast", True, [0.1], {"a": 1}, None],
    bool: ["maybe", 1, 0.0, [True], {"a": 1}, None],
    str: [7, 0.5, [1, 2], {"a": "b"}, None],
    list: ["a", 3, {"a": 1}, None],
    dict: ["a", 3, [1], None],
}
NUMBERS = [-1000, -1, 0, 1, 3, 1000]


def fields(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config, sections included, with its declared type."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        found[prefix + name] = hint
        if dataclasses.is_dataclass(hint):
            found.update(fields(hint, f"{prefix}{name}."))
    return found


FIELDS = fields()


def mutation(rng: random.Random, tree: dict) -> tuple[str, Any, bool]:
    """(dotted key, new value, whether the config must then be refused) for a random key of the config."""
    key = rng.choice(sorted(FIELDS))
    hint = FIELDS[key]
    base, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    kind = rng.choice(["type", "value", "typo"])
    if kind == "typo":  # a letter dropped, then maybe one added
        *parents, leaf = key.split(".")
        cut = rng.randrange(len(leaf))
        typo = leaf[:cut] + leaf[cut + 1:] + rng.choice(["", "s", "_x"])
        return ".".join([*parents, typo if typo != leaf else leaf + "_x"]), 1, True
    if dataclasses.is_dataclass(hint):  # a section that is no mapping
        return key, rng.choice([3, "all", [1, 2], None]), True
    if base is Literal:
        if kind == "type":
            return key, rng.choice([[args[0]], {"a": 1}, None, 2.5]), True
        return key, rng.choice([v for v in ("nope", "AUTO", "", -1) if v not in args]), True
    if kind == "type":
        return key, rng.choice(WRONG[base]), True
    if base is list:  # the right container, an element of the wrong type
        element = (typing.get_args(hint) or (Any,))[0]
        return key, [rng.choice(WRONG.get(element, [None]))], element is not Any
    if base in (int, float):
        return key, rng.choice(NUMBERS) * (1 if base is int else rng.choice([1, 0.5])), False
    return key, rng.choice(["", "x", "mixed", "ndcg@11", "sasrec2"]), False


def apply(tree: dict, key: str, value: Any) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(tree))
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return tree


def load(path, overrides: list[str]) -> None:
    """What runs before any work starts: the config, then the model parts it names."""
    check_model_parts(load_config(path, overrides))


def assert_refused_in_one_line(path, overrides: list[str], names: str, must_refuse: bool) -> None:
    try:
        load(path, overrides)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message
        assert names in message, (names, message)
    else:
        assert not must_refuse, f"accepted: {names} ({overrides or path})"


@pytest.mark.parametrize("preset", preset_names())
def test_mutated_presets_load_or_name_the_key_in_one_line(preset, tmp_path):
    rng = random.Random(f"fuzz-{preset}")
    text, _ = read_config_text(preset)
    tree = yaml.safe_load(text)
    for i in range(MUTATIONS_PER_PRESET):
        key, value, must_refuse = mutation(rng, tree)
        if rng.random() < 0.5:  # in the file
            path = tmp_path / f"{i}.yaml"
            path.write_text(yaml.safe_dump(apply(tree, key, value)))
            assert_refused_in_one_line(path, [], key, must_refuse)
        else:  # through --set, written as YAML (flow style: one line)
            written = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            assert_refused_in_one_line(preset, [f"{key}={written}"], key, must_refuse)


@pytest.mark.parametrize("preset", preset_names())
def test_presets_that_are_not_yaml_or_not_a_mapping_are_refused_in_one_line(preset, tmp_path):
    rng = random.Random(f"broken-{preset}")
    text, _ = read_config_text(preset)
    lines = text.splitlines()
    for i in range(10):
        path = tmp_path / f"{i}.yaml"
        at = rng.randrange(len(lines))
        broken = [*lines[:at], rng.choice(["  - [unclosed", "key: {a: 1", "\tindented: tab", ": :"]), *lines[at:]]
        path.write_text("\n".join(broken))
        assert_refused_in_one_line(path, [], "", must_refuse=True)
    for document in ("- a list", "just a string", "42"):
        (tmp_path / "doc.yaml").write_text(document)
        assert_refused_in_one_line(tmp_path / "doc.yaml", ["train.epochs=2"], "", must_refuse=True)
    for override in ("train.epochs=[1", "train.epochs={a: ", "model.dim=: :"):
        assert_refused_in_one_line(preset, [override], override.split("=")[0], must_refuse=True)
