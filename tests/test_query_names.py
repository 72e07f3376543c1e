"""--mode=query's output files: distinct photos never share answer files (a clear error before any work), and a
writer that fails midway leaves no partial file under a final name."""
import io
import shutil

import pytest
from PIL import Image

from helpers import error_paragraph
from netvlad_toolkit.modes import query
from test_query import query_cli


@pytest.mark.parametrize('names', [('a.jpg', 'a.png'), ('sub/b.jpg', 'sub__b.jpg'), ('C.jpg', 'c.jpg'),
                                   ('queries.jpg',)])
def test_photos_whose_answers_share_a_file_stop_before_any_work(random_float_run, places, tmp_path, run_cli, capsys,
                                                                monkeypatch, names):
    run_dir, _ = random_float_run
    database, photos, _ = places
    folder = tmp_path / 'colliding'
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / 'photo0.jpg', folder / name)
    monkeypatch.setattr(query, 'load_model', lambda opt: pytest.fail('the model was loaded'))
    assert query_cli(run_cli, run_dir, database, folder, tmp_path / 'out') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert all(str(folder / name) in message for name in names)
    assert not (tmp_path / 'out').exists()


def test_a_failing_picture_leaves_the_old_answer_whole(random_float_run, places, tmp_path, run_cli, monkeypatch):
    run_dir, _ = random_float_run
    database, photos, _ = places
    out = tmp_path / 'out'
    assert query_cli(run_cli, run_dir, database, photos, out, '--num_matched=2') == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    real_save = Image.Image.save

    def save_half_then_fail(image, fp, *args, **kwargs):
        encoded = io.BytesIO()
        real_save(image, encoded, format='PNG')
        half = encoded.getvalue()[:len(encoded.getvalue()) // 2]
        if hasattr(fp, 'write'):
            fp.write(half)
        else:
            with open(fp, 'wb') as f:
                f.write(half)
        raise OSError('No space left on device')

    monkeypatch.setattr(Image.Image, 'save', save_half_then_fail)
    with pytest.raises(OSError, match='No space left'):
        query_cli(run_cli, run_dir, database, photos, out, '--num_matched=2')
    for name in ('photo0.png', 'photo1.png', 'photo2.png'):
        assert (out / name).read_bytes() == before[name]
    assert not (out / 'queries.csv').exists()  # no summary vouches for the half-rewritten answers
    assert sorted(path.name for path in out.iterdir()) == sorted(set(before) - {'queries.csv'})
