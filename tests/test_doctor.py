import pytest

from tests.conftest import llava


@pytest.mark.slow
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


@pytest.mark.slow
def test_self_test_fails_when_the_answers_are_wrong(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that does not see colours (the random one) must make the self-test fail."""
    from llava_cli import synthetic
    from llava_cli.commands import doctor

    monkeypatch.setattr(synthetic, "build_colour_oracle", synthetic.build_random)
    assert doctor.self_test() is False
    out = capsys.readouterr().out
    assert "FAIL" in out.splitlines()[-1]


def test_self_test_reports_a_broken_model_as_fail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    from llava_cli import synthetic
    from llava_cli.commands import doctor

    original = synthetic.build_colour_oracle

    def truncated(directory: Path) -> synthetic.ModelPair:
        pair = original(directory)
        pair.model.write_bytes(pair.model.read_bytes()[:1000])
        return pair

    monkeypatch.setattr(synthetic, "build_colour_oracle", truncated)
    assert doctor.self_test() is False
    assert "self-test          FAIL: model file" in capsys.readouterr().out
