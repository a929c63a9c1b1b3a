"""runtime.host_memory: sizes as users write them, this machine's available memory (real
/proc and cgroup files, or files laid out like them), and the one-line refusal."""

from __future__ import annotations

import pytest

from runtime.errors import OptionError
from runtime.host_memory import MemoryBudgetError, available, cgroup_headroom, check_fits, parse_size, resident


@pytest.mark.parametrize("text, value", [("12GB", 12 * 10**9), ("12gb", 12 * 10**9), ("1.5GiB", 3 * 2**29),
                                         ("800MB", 800 * 10**6), ("800 MiB", 800 * 2**20), ("2TB", 2 * 10**12),
                                         ("64KiB", 65536), ("100KB", 100_000), ("4096B", 4096), (".5GB", 5 * 10**8)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, message", [
    ("12", "--max-memory '12': no unit; write a number and a unit, e.g. 12GB"),
    ("1.5", "no unit"),
    ("12XB", "unknown unit 'XB'"),
    ("12G", "unknown unit 'G'"),
    ("GB", "not a size"),
    ("-3GB", "not a size"),
    ("twelve", "not a size"),
    ("", "not a size"),
    ("0GB", "must be more than zero"),
    ("1e9B", "not a size"),
])
def test_bad_sizes_are_one_line_naming_the_option(text, message):
    with pytest.raises(OptionError, match=message) as exc:
        parse_size(text)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("--max-memory")


def test_the_option_is_named_as_given():
    with pytest.raises(OptionError, match="^--max-shard-size '7': no unit"):
        parse_size("7", "--max-shard-size")


def test_this_machine_reports_available_and_resident_memory():
    free = available()
    assert free is not None and free > 0
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/meminfo")}
    assert free <= meminfo["MemTotal"]
    assert 10 * 2**20 < resident() < meminfo["MemTotal"]  # this interpreter with pytest loaded


def _group(path, limit: str, current: int):
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.max").write_text(limit + "\n")
    (path / "memory.current").write_text(f"{current}\n")
    return path


def test_cgroup_headroom_is_the_limit_minus_the_usage(tmp_path):
    assert cgroup_headroom(_group(tmp_path / "a", "8000000000", 3_000_000_000)) == 5_000_000_000
    assert cgroup_headroom(_group(tmp_path / "b", "max", 3_000_000_000)) is None  # no limit set
    assert cgroup_headroom(tmp_path / "none") is None  # nothing readable
    assert cgroup_headroom(_group(tmp_path / "c", "1000", 5000)) == 0  # over its limit: no room


def test_check_fits_against_available_memory():
    line = check_fits("export", peak=5 * 10**9, free=8 * 10**9, held=10**9)
    assert line == "export: expected peak memory 5.0 GB, within 9.0 GB (available memory)"
    with pytest.raises(MemoryBudgetError) as exc:
        check_fits("export", peak=10 * 10**9, free=8 * 10**9, held=10**9,
                   alternatives={"--no-validate": 6 * 10**9, "--dtype fp16": 9_500_000_000})
    # Only what fits is named.
    assert str(exc.value) == ("export needs about 10.0 GB of memory at its peak, more than 8.0 GB available now "
                              "+ 1.0 GB held; --no-validate needs about 6.0 GB")
    with pytest.raises(MemoryBudgetError, match="; free memory, or run it on a machine with more$"):
        check_fits("export", peak=10 * 10**9, free=8 * 10**9, held=10**9, alternatives={"--no-validate": 9.5e9})
    # Within 5% of all the memory there is: the estimate's error could take it over.
    with pytest.raises(MemoryBudgetError, match="8.8 GB of memory at its peak, more than 8.0 GB available now"):
        check_fits("export", peak=8_800_000_000, free=8 * 10**9, held=10**9)
    assert check_fits("export", peak=8_500_000_000, free=8 * 10**9, held=10**9).endswith("within 9.0 GB (available memory)")
    # A budget the user states is theirs to set: no margin.
    assert check_fits("export", peak=3_990_000_000, max_memory=4 * 10**9, free=20 * 10**9, held=0)


def test_check_fits_against_max_memory():
    assert check_fits("quantize", peak=3 * 10**9, max_memory=4 * 10**9, free=20 * 10**9, held=0).endswith(
        "3.0 GB, within 4.0 GB (--max-memory)")
    assert check_fits("x", peak=3 * 10**8, max_memory=4 * 10**9, free=20 * 10**9, held=0, note=" (+ y)") == \
        "x: expected peak memory 300 MB (+ y), within 4.0 GB (--max-memory)"
    with pytest.raises(MemoryBudgetError, match="^quantize needs about 5.0 GB of memory at its peak, more than "
                                                "--max-memory 4.0 GB; "):
        check_fits("quantize", peak=5 * 10**9, max_memory=4 * 10**9, free=20 * 10**9, held=0)
    # A --max-memory above what is available: the machine's memory is the limit.
    with pytest.raises(MemoryBudgetError, match="more than 2.0 GB available now"):
        check_fits("quantize", peak=5 * 10**9, max_memory=40 * 10**9, free=2 * 10**9, held=0)
