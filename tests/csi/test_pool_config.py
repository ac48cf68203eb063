"""Pool configuration: HPP's --datadir JSON and the HostPathProvisioner CR (hpp_csi/config.py)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from drivertools import HPP_CSI

from hpp_csi.config import ConfigError, load_cr, parse_cr, parse_datadir

pytestmark = pytest.mark.timeout(30)


def cr(spec: dict[str, object]) -> str:
    return yaml.safe_dump({
        "apiVersion": "hostpathprovisioner.kubevirt.io/v1beta1",
        "kind": "HostPathProvisioner",
        "metadata": {"name": "hostpath-provisioner"},
        "spec": {"imagePullPolicy": "IfNotPresent", "workload": {"nodeSelector": {}}, **spec},
    })


# --- --datadir ----------------------------------------------------------------------------------------------
class TestDatadir:
    def test_hpp_default_shape(self) -> None:
        text = '[{"name":"legacy","path":"/csi-data-dir","snapshotPath":"/snap-dir","snapshotProvider":"reflink"}]'
        [pool] = parse_datadir(text)
        assert pool.name == "legacy"
        assert pool.path == Path("/csi-data-dir") and pool.volumes_dir == Path("/csi-data-dir")  # no csi/ subdir
        assert pool.device is None and pool.size is None and not pool.block_backed

    def test_several_pools_keep_order(self) -> None:
        pools = parse_datadir(json.dumps([{"name": n, "path": f"/data/{n}"} for n in ("b", "a", "c")]))
        assert [p.name for p in pools] == ["b", "a", "c"]

    def test_size_quantity(self) -> None:
        [pool] = parse_datadir('[{"name": "loop", "path": "/p", "size": "1Gi"}]')
        assert pool.size == 1 << 30 and pool.block_backed

    @pytest.mark.parametrize("text, words", [
        ("not json", ["not valid JSON"]),
        ('{"name": "legacy", "path": "/p"}', ["JSON array"]),
        ("[]", ["no storage pool"]),
        ('["legacy"]', ["object"]),
        ('[{"path": "/p"}]', ["name"]),
        ('[{"name": "legacy"}]', ["path"]),
        ('[{"name": "", "path": "/p"}]', ["name"]),
        ('[{"name": "legacy", "path": "relative/p"}]', ["absolute", "relative/p"]),
        ('[{"name": "a", "path": "/p"}, {"name": "a", "path": "/q"}]', ["'a'", "more than once"]),
        ('[{"name": "a", "path": "/p"}, {"name": "b", "path": "/p"}]', ["'/p'", "more than once"]),
        ('[{"name": "legacy", "path": "/p", "size": "lots"}]', ["size", "lots"]),
    ])
    def test_errors(self, text: str, words: list[str]) -> None:
        with pytest.raises(ConfigError) as info:
            parse_datadir(text)
        assert all(word in str(info.value) for word in words), str(info.value)

    def test_limits(self) -> None:
        parse_datadir(json.dumps([{"name": "n" * 50, "path": "/" + "p" * 254}]))
        with pytest.raises(ConfigError, match="longer than 50"):
            parse_datadir(json.dumps([{"name": "n" * 51, "path": "/p"}]))
        with pytest.raises(ConfigError, match="longer than 255"):
            parse_datadir(json.dumps([{"name": "n", "path": "/" + "p" * 255}]))


# --- HostPathProvisioner CR ---------------------------------------------------------------------------------
class TestCustomResource:
    def test_storage_pools_live_in_csi_subdir(self) -> None:
        pools = parse_cr(cr({"storagePools": [{"name": "local", "path": "/var/hpvolumes"},
                                              {"name": "fast", "path": "/mnt/nvme"}]}))
        assert [(p.name, p.path, p.volumes_dir) for p in pools] == [
            ("local", Path("/var/hpvolumes"), Path("/var/hpvolumes/csi")),
            ("fast", Path("/mnt/nvme"), Path("/mnt/nvme/csi")),
        ]

    def test_path_config_is_pool_legacy(self) -> None:
        [pool] = parse_cr(cr({"pathConfig": {"path": "/var/hpvolumes", "useNamingPrefix": False}}))
        assert (pool.name, pool.path, pool.volumes_dir) == ("legacy", Path("/var/hpvolumes"),
                                                            Path("/var/hpvolumes/csi"))

    def test_json_is_accepted(self) -> None:
        text = json.dumps(yaml.safe_load(cr({"storagePools": [{"name": "local", "path": "/v"}]})))
        assert [p.name for p in parse_cr(text)] == ["local"]

    @pytest.mark.parametrize("spec, words", [
        ({"pathConfig": {"path": "/a"}, "storagePools": [{"name": "x", "path": "/b"}]}, ["both"]),
        ({}, ["either", "storagePools", "pathConfig"]),
        ({"storagePools": []}, ["either"]),
        ({"pathConfig": {"path": ""}}, ["path"]),
        ({"storagePools": [{"name": "", "path": "/a"}]}, ["name"]),
        ({"storagePools": [{"name": "x", "path": ""}]}, ["path"]),
        ({"storagePools": [{"name": "x" * 51, "path": "/a"}]}, ["longer than 50"]),
        ({"storagePools": [{"name": "x", "path": "/" + "a" * 255}]}, ["longer than 255"]),
        ({"storagePools": [{"name": "x", "path": "/a"}, {"name": "x", "path": "/b"}]},
         ["'x'", "more than once", "storagePools[1]", "storagePools[0]"]),
        ({"storagePools": [{"name": "x", "path": "/a"}, {"name": "y", "path": "/a"}]},
         ["'/a'", "more than once", "storagePools[1]", "storagePools[0]"]),
        ({"storagePools": [{"name": "x", "path": "/a", "pvcTemplate": {"volumeMode": "Tape"}}]}, ["Tape"]),
        ({"storagePools": [{"name": "x", "path": "/a", "pvcTemplate": "big"}]}, ["pvcTemplate"]),
        ({"storagePools": [{"name": "x", "path": "/a", "pvcTemplate": {
            "resources": {"requests": {"storage": "ten gigs"}}}}]}, ["storage", "ten gigs"]),
    ])
    def test_errors(self, spec: dict[str, object], words: list[str]) -> None:
        with pytest.raises(ConfigError) as info:
            parse_cr(cr(spec), "hpp.yaml")
        message = str(info.value)
        assert message.startswith("hpp.yaml") and all(w in message for w in words), message

    def test_errors_name_the_pool_index(self) -> None:
        with pytest.raises(ConfigError, match=r"storagePools\[1\]"):
            parse_cr(cr({"storagePools": [{"name": "ok", "path": "/a"}, {"name": "x" * 51, "path": "/b"}]}))

    @pytest.mark.parametrize("text", ["spec: [unclosed", "kind: [a, b", "{{"])
    def test_bad_yaml(self, text: str) -> None:
        with pytest.raises(ConfigError, match="not valid YAML"):
            parse_cr(text, "hpp.yaml")

    @pytest.mark.parametrize("text", ["just a string", "- a\n- b", "apiVersion: v1\nkind: ConfigMap\nspec: {}",
                                      "apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner"])
    def test_not_a_cr(self, text: str) -> None:
        with pytest.raises(ConfigError):
            parse_cr(text)

    def test_pvc_template(self) -> None:
        template = {
            "volumeMode": "Block", "storageClassName": "local-block", "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "50Gi"}},
        }
        [pool] = parse_cr(cr({"storagePools": [{"name": "pvc", "path": "/var/pvc", "pvcTemplate": template}]}))
        assert pool.pvc_template is not None
        assert pool.pvc_template.volume_mode == "Block"
        assert pool.pvc_template.storage_class_name == "local-block"
        assert pool.pvc_template.access_modes == ("ReadWriteOnce",)
        assert pool.pvc_template.storage_bytes == 50 << 30
        assert pool.block_backed

    def test_pvc_template_defaults(self) -> None:
        [pool] = parse_cr(cr({"storagePools": [{"name": "pvc", "path": "/var/pvc", "pvcTemplate": {}}]}))
        assert pool.pvc_template is not None
        assert pool.pvc_template.volume_mode == "Filesystem" and pool.pvc_template.storage_bytes is None
        assert pool.pvc_template.storage_class_name is None and not pool.block_backed

    @pytest.mark.parametrize("quantity, expected", [("1Gi", 1 << 30), ("500M", 500 * 10**6), ("1.5Ki", 1536),
                                                    ("1e3", 1000), (2048, 2048)])
    def test_pvc_template_quantities(self, quantity: object, expected: int) -> None:
        template = {"resources": {"requests": {"storage": quantity}}}
        [pool] = parse_cr(cr({"storagePools": [{"name": "p", "path": "/p", "pvcTemplate": template}]}))
        assert pool.pvc_template is not None and pool.pvc_template.storage_bytes == expected

    def test_load_cr_file(self, tmp_path: Path) -> None:
        path = tmp_path / "hpp.yaml"
        path.write_text(cr({"storagePools": [{"name": "local", "path": "/var/hpvolumes"}]}))
        assert [p.name for p in load_cr(path)] == ["local"]
        with pytest.raises(ConfigError, match="cannot read"):
            load_cr(tmp_path / "missing.yaml")


# --- the CLI --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("datadir, words", [
    ("not json", ["--datadir", "JSON"]),
    ('[{"name": "legacy"}]', ["path"]),
    ('[{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]', ["'a'"]),
])
def test_cli_refuses_bad_datadir(tmp_path: Path, datadir: str, words: list[str]) -> None:
    result = subprocess.run(
        [HPP_CSI, "serve", "--nodeid", "n", "--endpoint", f"unix://{tmp_path}/csi.sock", "--datadir", datadir],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("hpp-csi:") and all(w in result.stderr for w in words), result.stderr
    assert not (tmp_path / "csi.sock").exists()


def test_cli_refuses_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "hpp.yaml"
    config.write_text(textwrap.dedent("""\
        apiVersion: hostpathprovisioner.kubevirt.io/v1beta1
        kind: HostPathProvisioner
        spec:
          pathConfig: {path: /a}
          storagePools: [{name: x, path: /b}]
    """))
    result = subprocess.run([HPP_CSI, "serve", "--nodeid", "n", "--endpoint", f"unix://{tmp_path}/csi.sock",
                             "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and str(config) in result.stderr and "both" in result.stderr


def test_cli_requires_pools(tmp_path: Path) -> None:
    result = subprocess.run([HPP_CSI, "serve", "--nodeid", "n"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--datadir" in result.stderr
