"""The training program's configuration: presets, a JSON file, flags.

A configuration starts from a preset, the chapter's ``CPU_CONFIG`` or
``GPU_CONFIG`` with the values only the program needs, then takes the
values of a JSON file (``--config``), then those of flags (``--lr 0.05``).
Every value must have its preset's type and lie in its range; the first
that does not is named in the error, before the program joins its process
group or touches data or model.
"""
import argparse
import json
import math
import os

import torch

from d2l_face import torch as d2lf

DESCRIPTION = 'Train a face recognition model with the chapter\'s library.'
# The chapter's configurations, and what only the program needs.
PROGRAM_DEFAULTS = dict(
    data='', out='', val_dirs=[], seed=0, micro_batches=1, sample_rate=1.0,
    checkpoint_every=100, log_every=10, dropout=0.0, fp16=False,
    dtype='float32', dist_timeout=600, loader_threads=0)
PRESETS = {'cpu': dict(d2lf.CPU_CONFIG, **PROGRAM_DEFAULTS),
           'gpu': dict(d2lf.GPU_CONFIG, **dict(PROGRAM_DEFAULTS, fp16=True))}
# Keys that must be > 0, >= 0, or a choice.
POSITIVE = {'width', 'embedding_size', 'batch_per_device', 'num_steps',
            'eval_every', 'lr', 's', 'micro_batches', 'sample_rate',
            'checkpoint_every', 'log_every', 'dist_timeout'}
NON_NEGATIVE = {'warmup_steps', 'wd', 'momentum', 'dropout', 'seed',
                'loader_threads'}
CHOICES = {'depth': sorted(d2lf.FACE_RESNET_UNITS),
           'margin': sorted(d2lf.MARGIN_SETTINGS),
           'dtype': ['float32', 'float64']}


class ConfigError(ValueError):
    """A configuration value that cannot be trained with."""


def check_value(key, value, default):
    """`value` of `key`, of the preset's type; ConfigError if unusable."""
    kind = type(default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f'{key} must be {kind.__name__}, not {value!r}')
    if kind is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{key} must be a list of folder names')
    if kind is float and not math.isfinite(value):
        raise ConfigError(f'{key} must be a finite number, not {value!r}')
    if key in POSITIVE and not value > 0:
        raise ConfigError(f'{key} must be positive, not {value!r}')
    if key in NON_NEGATIVE and not value >= 0:
        raise ConfigError(f'{key} must not be negative, not {value!r}')
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f'{key} must be one of {CHOICES[key]}, not '
                          f'{value!r}')
    return value


def check_config(config, preset):
    """The checked configuration: preset values replaced by `config`'s."""
    unknown = sorted(set(config) - set(preset))
    if unknown:
        raise ConfigError(f'unknown key {unknown[0]!r} (known: '
                          f'{", ".join(sorted(preset))})')
    cfg = {key: check_value(key, config.get(key, default), default)
           for key, default in preset.items()}
    if cfg['sample_rate'] > 1:
        raise ConfigError(f'sample_rate must be at most 1, not '
                          f'{cfg["sample_rate"]!r}')
    if cfg['dropout'] >= 1:
        raise ConfigError(f'dropout must be below 1, not {cfg["dropout"]!r}')
    for key in ('data', 'out'):
        if not cfg[key]:
            raise ConfigError(f'{key} is required (--{key} DIR)')
    for folder in [cfg['data']] + cfg['val_dirs']:
        if not os.path.isdir(folder):
            raise ConfigError(f'{folder}: not a folder')
    if cfg['fp16'] and not torch.cuda.is_available():
        raise ConfigError('fp16 needs CUDA GPUs; this machine has none')
    return cfg


def parse_bool(text):
    """A flag's true or false."""
    if text.lower() not in ('true', 'false', '1', '0'):
        # argparse shows this message (of a ValueError, only the type name)
        raise argparse.ArgumentTypeError(f'not true or false: {text!r}')
    return text.lower() in ('true', '1')


def parse_config(argv=None):
    """Preset, then the --config JSON file, then flags; checked."""
    parser = argparse.ArgumentParser(
        prog='python -m d2l_face.train', description=DESCRIPTION)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--config', help='JSON file of configuration values')
    for key, default in PRESETS['cpu'].items():
        kind = {bool: parse_bool, list: lambda s: s.split(',') if s else []
                }.get(type(default), type(default))
        parser.add_argument('--' + key.replace('_', '-'), dest=key,
                            type=kind, default=argparse.SUPPRESS,
                            help=f'default (cpu): {default!r}')
    args = vars(parser.parse_args(argv))
    preset, file = PRESETS[args.pop('preset')], args.pop('config')
    config = {}
    try:
        if file:
            with open(file) as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ConfigError(f'{file}: must hold a JSON object')
        return check_config({**config, **args}, preset)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        parser.error(str(e))  # exits with status 2
