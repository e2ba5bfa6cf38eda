"""`d2l_face.train_config`: the training program's presets, JSON file and
flags, each value checked before anything is trained or written."""
import json

import pytest
import torch

from d2l_face import train_config


def parse(tmp_path, *args):
    """parse_config with an existing data folder and an output folder."""
    data = tmp_path / 'data'
    data.mkdir(exist_ok=True)
    return train_config.parse_config(['--data', str(data), '--out',
                                      str(tmp_path / 'out'), *args])


def test_flags_override_the_preset_and_keep_its_types(tmp_path):
    cfg = parse(tmp_path, '--lr', '1', '--num-steps', '7', '--fp16', 'false',
                '--val-dirs', f'{tmp_path},{tmp_path}')
    assert cfg['lr'] == 1.0 and type(cfg['lr']) is float  # int to float
    assert cfg['num_steps'] == 7
    assert cfg['fp16'] is False
    assert cfg['val_dirs'] == [str(tmp_path)] * 2
    for key in ('depth', 'width', 'warmup_steps', 'margin'):
        assert cfg[key] == train_config.PRESETS['cpu'][key]


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({'lr': 0.5, 'num_steps': 9}))
    cfg = parse(tmp_path, '--config', str(config), '--num-steps', '3')
    assert (cfg['lr'], cfg['num_steps']) == (0.5, 3)


@pytest.mark.parametrize('args, message', [
    (['--lr', '-1'], 'lr must be positive'),
    (['--num-steps', '2.5'], "--num-steps: invalid int value: '2.5'"),
    (['--s', 'nan'], 's must be a finite number'),
    (['--dropout', '1'], 'dropout must be below 1'),
    (['--margin', 'bogus'], 'margin must be one of'),
    (['--sample-rate', '1.5'], 'sample_rate must be at most 1'),
    (['--val-dirs', '/nonexistent'], '/nonexistent: not a folder'),
    (['--fp16', 'maybe'], "not true or false: 'maybe'"),
])
def test_bad_flag_is_named(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as error:
        parse(tmp_path, *args)
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('text, message', [
    ('{"lr": 0.1, "bogus": 1}', "unknown key 'bogus'"),
    ('{"s": NaN}', 's must be a finite number'),
    ('{"momentum": Infinity}', 'momentum must be a finite number'),
    ('{"fp16": 1}', 'fp16 must be bool'),
    ('[1, 2]', 'must hold a JSON object'),
])
def test_bad_config_file_is_named(tmp_path, capsys, text, message):
    config = tmp_path / 'config.json'
    config.write_text(text)
    with pytest.raises(SystemExit):
        parse(tmp_path, '--config', str(config))
    assert message in capsys.readouterr().err


def test_data_and_out_are_required(capsys):
    with pytest.raises(SystemExit):
        train_config.parse_config([])
    assert 'data is required (--data DIR)' in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU trains fp16')
def test_the_gpu_preset_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(tmp_path, '--preset', 'gpu')
    assert 'fp16 needs CUDA GPUs' in capsys.readouterr().err
