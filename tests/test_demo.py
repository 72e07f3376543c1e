"""The demo end to end at its tiny size, and --mode=report on bad results files."""
import json

from PIL import Image

VARIANTS = ['off-the-shelf (k-means init)', 'trained', 'pruned structured 20%', 'pruned structured 50%',
            'pruned unstructured 20%', 'int8 static', 'pruned structured 50% + int8 static', 'int8 qat',
            'distilled from alexnet trained', 'distilled from alexnet trained, queries against the alexnet trained '
            'database', 'distilled from alexnet trained + int8 static',
            'trained', 'trained + PCA-whitening 32', 'trained + PCA-whitening 32 + patch re-ranking (speed_p5_s1_d32)']
# --mode=pca evaluates the raw descriptor too: the trained model's second record, the newer one


def test_tiny_demo_runs_every_stage_and_draws(run_cli, tmp_path, capsys):
    runs = tmp_path / 'runs'
    assert run_cli(['--mode=demo', '--demo_size=tiny', '--runsPath', runs, '--dataPath', tmp_path / 'data',
                    '--nocuda', '--threads=0']) == 0
    records = [json.loads(line) for line in (runs / 'results.jsonl').read_text().splitlines()]
    assert [r['variant'] for r in records] == VARIANTS  # one record per evaluating stage, in order
    newest = {r['variant']: r for r in records}.values()
    assert all(r['latency_ms'] > 0 and r['latency_size'] == '64x80' for r in newest)  # all timed in one run
    # each record carries the command line of its own stage, as the user would type it
    assert all(r['command'].startswith('python main.py --mode=') and '--mode=demo' not in r['command']
               for r in records)
    table = (runs / 'results.md').read_text()
    assert table in capsys.readouterr().out
    assert {r['arch'] for r in records if 'distilled' in r['variant']} == {'mobilenet_v3_large'}
    for record in newest:
        row = next(line for line in table.splitlines() if f'| {record["arch"]} {record["variant"]} |' in line)
        recalls = [float(v) for v in row.split('|')[3:7]]
        assert len(recalls) == 4 and all(0.0 <= r <= 1.0 for r in recalls)
    assert 'TBD' not in table
    reranked = records[-1]['rerank']
    assert reranked['candidates'] == 30 and reranked['ms_per_query'] > 0  # the whole database re-ranked
    assert set(reranked['global_recalls']) == set(records[-1]['recalls'])
    assert f'+ {reranked["ms_per_query"]:.0f} re-ranking per query' in table.splitlines()[-1]
    run = runs / 'alexnet_netvlad_checkpoint' / 'alexnet_netvlad_checkpoint'
    for picture in ('recall_curves.png', 'retrievals.png'):
        with Image.open(run / picture) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100


def test_report_on_missing_empty_or_corrupt_results(run_cli, tmp_path, capsys):
    assert run_cli(['--mode=report', '--runsPath', tmp_path]) == 2
    assert 'does not exist' in capsys.readouterr().err
    (tmp_path / 'results.jsonl').write_text('')
    assert run_cli(['--mode=report', '--runsPath', tmp_path]) == 2
    assert 'is empty' in capsys.readouterr().err
    (tmp_path / 'results.jsonl').write_text('{"variant": "trained", "recalls": {"1": 0.5}}\n{not json\n')
    assert run_cli(['--mode=report', '--runsPath', tmp_path]) == 2
    captured = capsys.readouterr()
    assert 'only damaged lines' in captured.err and 'Traceback' not in captured.err
    assert 'line 1 ' in captured.out and 'line 2 ' in captured.out  # each damaged line named in a warning


def test_demo_refuses_a_runs_folder_that_holds_its_run(run_cli, tmp_path, capsys):
    run = tmp_path / 'runs' / 'alexnet_netvlad_checkpoint' / 'alexnet_netvlad_checkpoint'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'checkpoints' / 'checkpoint.pth.tar').write_bytes(b'a day of training')
    assert run_cli(['--mode=demo', '--demo_size=tiny', '--runsPath', tmp_path / 'runs', '--dataPath',
                    tmp_path / 'data', '--nocuda', '--threads=0']) == 2
    assert '--runsPath' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['runs']
    assert (run / 'checkpoints' / 'checkpoint.pth.tar').read_bytes() == b'a day of training'
