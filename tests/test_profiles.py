"""Firmware profiles: the shipped TOML files, detection on fake board trees, and garbage.

The trees under tests/boards/<board>/ copy the layout of real boards: the
NUL-terminated device-tree model, /etc/nv_tegra_release, /dev/apex_0, USB ids,
INA3221 hwmon/iio, RAPL, thermal zones and cpufreq.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.common.errors import ProfileError
from agent.profiles.detect import detect_profile
from agent.profiles.schema import (
    PROFILES_DIR_ENV,
    Profile,
    ProfileFileError,
    default_profiles_dir,
    load_profile,
    load_profiles,
    under_root,
)
from agent.protocol.manifest import VARIANTS

BOARDS = Path(__file__).parent / "boards"
SHIPPED = Path(__file__).resolve().parent.parent / "agent" / "profiles" / "data"
EXPECTED = {
    "rpi4", "rpi5", "rpi-coral-usb", "coral-devboard",
    "jetson-nano", "jetson-orin-nano", "jetson-agx-orin", "x86-gateway",
}


@pytest.fixture(scope="module")
def profiles() -> dict[str, Profile]:
    return load_profiles(SHIPPED)


def test_every_board_family_has_a_profile(profiles: dict[str, Profile]) -> None:
    assert set(profiles) >= EXPECTED
    for profile in profiles.values():
        assert profile.runtime.num_threads >= 1
        assert set(profile.runtime.variant_preference) <= set(VARIANTS)
        assert profile.power.load_w >= profile.power.idle_w > 0
        assert profile.source.parent == SHIPPED


def test_default_dir_is_the_shipped_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILES_DIR_ENV, raising=False)
    assert default_profiles_dir() == SHIPPED
    monkeypatch.setenv(PROFILES_DIR_ENV, "/opt/edgefleet/profiles")
    assert default_profiles_dir() == Path("/opt/edgefleet/profiles")


@pytest.mark.parametrize(("board", "machine", "expected"), [
    ("rpi4", "aarch64", "rpi4"),
    ("rpi5", "aarch64", "rpi5"),
    ("rpi-coral-usb", "aarch64", "rpi-coral-usb"),
    ("rpi5-coral-usb-unflashed", "aarch64", "rpi-coral-usb"),
    ("coral-devboard", "aarch64", "coral-devboard"),
    ("jetson-nano", "aarch64", "jetson-nano"),
    ("jetson-orin-nano", "aarch64", "jetson-orin-nano"),
    ("jetson-agx-orin", "aarch64", "jetson-agx-orin"),
    ("x86-gateway", "x86_64", "x86-gateway"),
])
def test_detects_each_board(
    profiles: dict[str, Profile], board: str, machine: str, expected: str
) -> None:
    assert detect_profile(profiles, BOARDS / board, machine=machine).name == expected


def test_coral_usb_outranks_the_plain_pi(profiles: dict[str, Profile]) -> None:
    coral = profiles["rpi-coral-usb"]
    assert coral.priority > profiles["rpi4"].priority
    assert coral.priority > profiles["rpi5"].priority
    assert coral.runtime.delegate == "edgetpu" and coral.runtime.delegate_device == "usb"
    assert coral.runtime.variant_preference == ("edgetpu", "int8-cpu")
    assert profiles["rpi4"].runtime.variant_preference == ("int8-cpu",)


def test_profile_paths_exist_in_the_board_trees(profiles: dict[str, Profile]) -> None:
    """The power and thermal paths each profile names are where the board keeps them."""
    def paths(board: str) -> list[str | None]:
        p = profiles[board]
        return [p.power.hwmon_glob, p.power.iio_glob, p.power.energy_path,
                p.power.max_energy_path, p.thermal.zones_glob, p.thermal.cpufreq_path,
                *p.thermal.extra_temp_paths]

    checks = {board: paths(board) for board in EXPECTED}
    # The Nano's L4T R32 may lack soctherm_oc counters; the Orins have them.
    for board in ("jetson-orin-nano", "jetson-agx-orin"):
        checks[board].append(profiles[board].thermal.oc_hwmon_glob)
    for board, wanted in checks.items():
        for path in filter(None, wanted):
            assert list(BOARDS.joinpath(board).glob(path.lstrip("/"))), (board, path)
    assert profiles["jetson-nano"].power.total_rail == "POM_5V_IN"
    assert profiles["jetson-orin-nano"].power.total_rail == "VDD_IN"
    assert profiles["jetson-agx-orin"].power.total_rail is None  # no VDD_IN: sum the rails
    assert profiles["rpi5"].power.command == ("vcgencmd", "pmic_read_adc")


def test_under_root() -> None:
    assert under_root(BOARDS / "rpi4", "/sys/class") == BOARDS / "rpi4/sys/class"


def test_override_wins_over_detection(profiles: dict[str, Profile]) -> None:
    chosen = detect_profile(profiles, BOARDS / "rpi4", override="jetson-nano", machine="aarch64")
    assert chosen.name == "jetson-nano"
    assert detect_profile(profiles, BOARDS / "rpi4", override="auto").name == "rpi4"
    with pytest.raises(ProfileError, match="override 'rpi9' is not a known profile"):
        detect_profile(profiles, BOARDS / "rpi4", override="rpi9")


@pytest.mark.parametrize(("board", "machine"), [
    ("rpi3-unsupported", "aarch64"),
    ("x86-no-rapl", "x86_64"),
    ("x86-gateway", "aarch64"),
])
def test_unknown_board_is_a_clear_error(
    profiles: dict[str, Profile], board: str, machine: str
) -> None:
    with pytest.raises(ProfileError, match="no firmware profile matches") as info:
        detect_profile(profiles, BOARDS / board, machine=machine)
    assert machine in str(info.value) and "Set 'profile'" in str(info.value)


def test_empty_root_is_a_clear_error(profiles: dict[str, Profile], tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="device-tree model None"):
        detect_profile(profiles, tmp_path, machine="aarch64")


def test_orin_nano_is_not_mistaken_for_a_nano(
    profiles: dict[str, Profile], tmp_path: Path
) -> None:
    shutil.copytree(BOARDS / "jetson-nano", tmp_path / "board")
    model = tmp_path / "board/proc/device-tree/model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    # An Orin device tree with a Nano's L4T release matches neither profile.
    with pytest.raises(ProfileError, match="no firmware profile matches"):
        detect_profile(profiles, tmp_path / "board", machine="aarch64")


# ---- garbage ---------------------------------------------------------------------


def _copy_profile(tmp_path: Path, name: str, edit: tuple[str, str] | None = None) -> Path:
    text = (SHIPPED / f"{name}.toml").read_text()
    if edit is not None:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1], 1)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "edit", "field", "reason"), [
    ("rpi4", ("num_threads = 4", "num_threads = \"4\""), "[runtime].num_threads", "integer"),
    ("rpi4", ("num_threads = 4", "num_threads = 0"), "[runtime].num_threads", "outside"),
    ("rpi4", ('type = "auto"', 'type = "onnx"'), "[runtime].type", "unknown value 'onnx'"),
    ("rpi4", ('delegate = "none"', 'delegate = "hexagon"'), "[runtime].delegate", "unknown"),
    ("rpi4", ('["int8-cpu"]', '["int4-cpu"]'), "[runtime].variant_preference", "int4-cpu"),
    ("rpi4", ('method = "estimate"', 'method = "multimeter"'), "[power].method", "unknown"),
    ("rpi4", ("idle_w = 2.7", "idle_w = 9.0"), "[power].load_w", "below idle_w"),
    ("rpi4", ("idle_w = 2.7", "idle_w = true"), "[power].idle_w", "number"),
    ("rpi4", ("priority = 20", "priority = 20\ncolour = \"red\""), "colour", "unknown key"),
    ("rpi4", ('name = "rpi4"', 'name = "rpi5"'), "name", "file name"),
    ("rpi4", ("[thermal]", "[thermals]"), "[thermal]", "missing"),
    ("rpi4", ('throttle_method = "vcgencmd"', 'throttle_method = "soctherm"'),
     "[thermal].oc_hwmon_glob", "missing"),
    ("rpi5", ('command = ["vcgencmd", "pmic_read_adc"]', "command = []"),
     "[power].command", "empty"),
    ("rpi5", ('method = "rpi5_pmic"', 'method = "estimate"'), "[power].command",
     "unknown key for power method 'estimate'"),
    ("x86-gateway", ('energy_path = "/sys', 'energy_path = "sys'), "[power].energy_path",
     "absolute"),
    ("x86-gateway", ('paths_present = ["/sys', 'paths_present = ["/../sys'),
     "[detect].paths_present", "absolute"),
    ("rpi-coral-usb", ('"18d1:9302"', '"18D1-9302"'), "[detect].usb_ids", "18D1-9302"),
    ("rpi-coral-usb", ('delegate = "edgetpu"', 'delegate = "none"'),
     "[runtime].delegate_device", "delegate is 'none'"),
    ("jetson-nano", ('device_tree_model = ["Jetson Nano"]\n', ""), "[detect].nv_tegra_release",
     None),
])
def test_bad_fields_name_file_and_field(
    tmp_path: Path, name: str, edit: tuple[str, str], field: str, reason: str | None
) -> None:
    path = _copy_profile(tmp_path, name, edit)
    if reason is None:  # still valid: a rule may be dropped as long as one remains
        assert load_profile(path).detect.device_tree_model == ()
        return
    with pytest.raises(ProfileFileError) as info:
        load_profile(path)
    assert info.value.path == path
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(path) in str(info.value) and field in str(info.value)


def test_detect_without_rules_is_refused(tmp_path: Path) -> None:
    path = _copy_profile(tmp_path, "x86-gateway")
    text = path.read_text()
    start, end = text.index("machine ="), text.index("[runtime]")
    path.write_text(text[:start] + text[end:])
    with pytest.raises(ProfileFileError, match="match every board"):
        load_profile(path)


@pytest.mark.parametrize("content", [
    b"name = \"rpi4\"\n[detect\n",
    b"name = rpi4\n",
    b"\xff\xfe garbage \x00\x01",
    b"[runtime]\ntype = \"auto\"\n[runtime]\ntype = \"litert\"\n",
])
def test_garbage_toml(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "rpi4.toml"
    path.write_bytes(content)
    with pytest.raises(ProfileFileError, match="invalid TOML") as info:
        load_profile(path)
    assert info.value.field == "(file)"


def test_a_table_where_a_value_belongs(tmp_path: Path) -> None:
    path = _copy_profile(tmp_path, "rpi4", ('description = "', 'description.x = "'))
    with pytest.raises(ProfileFileError, match="description: must be a string"):
        load_profile(path)


def test_one_bad_file_fails_the_whole_directory(tmp_path: Path) -> None:
    for name in ("rpi4", "rpi5"):
        _copy_profile(tmp_path, name)
    assert set(load_profiles(tmp_path)) == {"rpi4", "rpi5"}
    (tmp_path / "broken.toml").write_text("priority = 'high'\n")
    with pytest.raises(ProfileFileError, match=r"broken\.toml"):
        load_profiles(tmp_path)


def test_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profiles(tmp_path / "absent")
    with pytest.raises(ProfileError, match=r"holds no \.toml"):
        load_profiles(tmp_path)


def test_equal_priority_tie_is_refused(tmp_path: Path) -> None:
    _copy_profile(tmp_path, "rpi4")
    text = (SHIPPED / "rpi4.toml").read_text().replace('name = "rpi4"', 'name = "rpi4-clone"')
    (tmp_path / "rpi4-clone.toml").write_text(text)
    profiles = load_profiles(tmp_path)
    assert set(profiles) == {"rpi4", "rpi4-clone"}
    with pytest.raises(ProfileError, match="both match with priority 20"):
        detect_profile(profiles, BOARDS / "rpi4", machine="aarch64")
