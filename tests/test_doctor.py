from tests.conftest import llava


def test_doctor_reports_and_passes_its_self_test() -> None:
    result = llava("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.decode()
    for label in ("llava", "python", "llama-cpp-python", "backend", "cpu features", "threads"):
        assert f"\n{label} " in "\n" + out
    assert "red image -> 'red': PASS" in out
    assert "blue image -> 'blue': PASS" in out
    assert out.rstrip().splitlines()[-1].startswith("self-test          PASS")
    assert result.stderr == b""
