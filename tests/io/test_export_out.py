"""``cheers export --out``: a file, or a path under a file, is one line before the model is loaded."""

import pytest

from cheers_pl.io import export


@pytest.mark.parametrize("sub", ["", "sub"])
def test_an_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys, sub):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / sub if sub else tmp_path / "file"
    with pytest.raises(SystemExit) as err:
        export.main([str(tmp_path / "nowhere.ckpt"), "--out", str(out)])
    text = capsys.readouterr().err.strip()
    assert err.value.code == 2 and len(text.splitlines()) == 1
    assert "--out" in text and "is a file" in text and "nowhere" not in text  # not loaded yet
