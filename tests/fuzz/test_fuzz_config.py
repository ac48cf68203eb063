"""The pool configuration (hpp_csi/config.py): the HPP CR file (YAML) and --datadir (JSON) come from whoever
deploys the driver. Any text or any document shape gives pools or a ConfigError, never a traceback; a valid
configuration gives back exactly the pools it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from fuzzkit import fuzz
from hypothesis import example, given
from hypothesis import strategies as st

from hpp_csi.config import CR_VOLUMES_SUBDIR, ConfigError, parse_cr, parse_datadir

API = "hostpathprovisioner.kubevirt.io/v1beta1"
KIND = "HostPathProvisioner"

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["10Gi", "1e400", "-1", "Block", "Filesystem", "/x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right shape, sometimes anything."""
    return st.one_of(plausible, plausible, values)


names = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,20}\Z")
paths = names.map(lambda n: f"/var/{n}")
templates = st.fixed_dictionaries({}, optional={
    "volumeMode": field(st.sampled_from(["Block", "Filesystem"])),
    "accessModes": field(st.lists(st.sampled_from(["ReadWriteOnce", "ReadWriteMany"]), max_size=2)),
    "storageClassName": field(st.text(max_size=10)),
    "resources": field(st.fixed_dictionaries({"requests": field(st.fixed_dictionaries(
        {"storage": field(st.sampled_from(["1Gi", "500M", "1e3", "x", "1e9999999"]))}))})),
})
pools = st.fixed_dictionaries({"name": field(names), "path": field(paths)}, optional={
    "pvcTemplate": field(templates), "size": field(st.sampled_from(["4Gi", "1Mi", "0", "-3"])),
    "device": field(st.just("/dev/sdz")),
})
documents = st.fixed_dictionaries({
    "apiVersion": field(st.just(API)), "kind": field(st.just(KIND)),
    "spec": field(st.fixed_dictionaries({}, optional={
        "storagePools": field(st.lists(field(pools), max_size=3)),
        "pathConfig": field(st.fixed_dictionaries({"path": field(paths)})),
    })),
})


def parses_or_refuses(parse: Any, text: str) -> None:
    try:
        result = parse(text)
    except ConfigError as err:
        assert str(err), "a ConfigError must say what is wrong"
        return
    assert result and all(p.path.is_absolute() for p in result)


@fuzz(300)
@given(st.text(max_size=200))
@example("a: 2001-13-01")  # a YAML timestamp that resolves but cannot be built
@example("a: !!float x")
@example("[" * 3000)  # nesting deeper than the parser recurses
@example(f"apiVersion: {API}\nkind: {KIND}\nspec:\n  storagePools:\n  - name: a\n    path: /a\n"
         "    pvcTemplate:\n      resources: x\n")
def test_any_text_as_a_cr_is_pools_or_a_config_error(text: str) -> None:
    parses_or_refuses(parse_cr, text)


@fuzz(300)
@given(documents)
def test_any_cr_shape_is_pools_or_a_config_error(document: dict[str, Any]) -> None:
    parses_or_refuses(parse_cr, yaml.safe_dump(document))


@fuzz(150)
@given(documents, st.data())
def test_mutated_cr_text_is_pools_or_a_config_error(document: dict[str, Any], data: st.DataObject) -> None:
    text = yaml.safe_dump(document)
    cut = data.draw(st.integers(0, len(text)))
    noise = data.draw(st.text(alphabet=" \n\t:-[]{}&*!|>'\"#%@`,?0123456789ab", max_size=6))
    parses_or_refuses(parse_cr, text[:cut] + noise + text[cut + data.draw(st.integers(0, 4)):])


@fuzz(200)
@given(st.one_of(st.text(max_size=120), st.lists(field(pools), max_size=3).map(json.dumps)))
@example("[" * 100000)
def test_any_datadir_is_pools_or_a_config_error(text: str) -> None:
    parses_or_refuses(parse_datadir, text)


unique_pools = st.lists(names, min_size=1, max_size=4, unique=True)


@fuzz(100)
@given(unique_pools)
def test_a_valid_cr_gives_exactly_its_pools(pool_names: list[str]) -> None:
    document = {"apiVersion": API, "kind": KIND,
                "spec": {"storagePools": [{"name": n, "path": f"/var/{n}"} for n in pool_names]}}
    parsed = parse_cr(yaml.safe_dump(document))
    assert [p.name for p in parsed] == pool_names
    assert [p.volumes_dir for p in parsed] == [Path(f"/var/{n}") / CR_VOLUMES_SUBDIR for n in pool_names]


@fuzz(100)
@given(unique_pools)
def test_a_valid_datadir_gives_exactly_its_pools(pool_names: list[str]) -> None:
    parsed = parse_datadir(json.dumps([{"name": n, "path": f"/var/{n}"} for n in pool_names]))
    assert [(p.name, p.volumes_dir) for p in parsed] == [(n, Path(f"/var/{n}")) for n in pool_names]
