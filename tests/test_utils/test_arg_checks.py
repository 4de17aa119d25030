"""Every class mmpfc registers checks its config arguments when it is built.

The walk builds each registered class once per wrong value of each checked
argument (``mmpfc.utils.arg_checks``) and expects a TypeError / ValueError
that names the class, the argument and the value. Run this file as a script
to print how many arguments and wrong values it tries.
"""
import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from messages import assert_mentions
from mmengine.registry import Registry

import mmpfc
import mmpfc.registry
from mmpfc.evaluation.functional.verification import evaluate_pairs
from mmpfc.utils.arg_checks import (Arg, ConfigTypeError, Int, Real, arg_specs,
                                    bound_arguments, specs_of)

#: Registered classes with no constructor arguments of mmpfc's own.
NO_CHECKABLE_ARGS = {
    'CheckpointHook': "no __init__: MMEngine CheckpointHook's arguments, "
                      'unchanged',
    'FaceDataPreprocessor': "no __init__: mmpretrain's ClsDataPreprocessor "
                            'arguments, unchanged',
    'FlipIfRequested': 'takes no arguments',
    'PartialFCRunner': "no __init__: MMEngine Runner's arguments (mmpfc's "
                       'overwrite option is a config key, read in train)',
    'face_collate': 'a collate function: its one argument is the batch',
    'encoded_face_collate': 'a collate function: its one argument is the '
                            'batch',
}
#: Registered by work in progress whose author adds its specs.
PENDING = {}


def _optimizer() -> dict:
    return dict(optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(),
                                          lr=0.1))


#: Valid values of required arguments (the wrong value is the only one).
BASE_ARGS = {
    'PartialFCHead': lambda: dict(num_classes=4, in_channels=8),
    'MarginSoftmaxHead': lambda: dict(num_classes=4, in_channels=8),
    'FaceRecognizer': lambda: dict(backbone=dict(type='MobileFaceNet')),
    'SyntheticFaceDataset': lambda: dict(num_classes=2, num_samples=2),
    'SyntheticIdentityDataset': lambda: dict(num_classes=2),
    'FaceVerificationDataset': lambda: dict(ann_file='lfw.bin'),
    'PartialFCOptimWrapper': _optimizer,
    'PartialFCAmpOptimWrapper': _optimizer,
    'PartialFCDistributedDataParallel': lambda: dict(module=nn.Linear(2, 2)),
}


def registered_classes() -> dict:
    """name -> class of everything mmpfc's registries hold from the
    package, after importing every module of it (a class registered
    anywhere in it is found; those tests register are not mmpfc's)."""
    for module in pkgutil.walk_packages(mmpfc.__path__, 'mmpfc.'):
        importlib.import_module(module.name)
    found = {}
    for registry in vars(mmpfc.registry).values():
        if isinstance(registry, Registry) and registry.scope == 'mmpfc':
            found.update((name, cls)
                         for name, cls in registry.module_dict.items()
                         if cls.__module__.startswith('mmpfc.'))
    return found


def checked_arguments(cls: type) -> dict:
    """The valid arguments of the walk (base args and defaults)."""
    base = BASE_ARGS.get(cls.__name__, dict)()
    signature = inspect.signature(cls.__init__)
    args = bound_arguments(signature, (None, ), base)
    assert args is not None, f'{cls.__name__}: BASE_ARGS do not fit'
    return base, args


def walk():
    """(class name, argument, wrong value, error or None) for every wrong
    value of every checked argument of every registered class."""
    for name, cls in sorted(registered_classes().items()):
        if name in NO_CHECKABLE_ARGS or name in PENDING:
            continue
        base, args = checked_arguments(cls)
        for arg, spec in specs_of(cls).items():
            for wrong in spec.wrong_values(args):
                try:
                    cls(**{**base, arg: wrong})
                except Exception as err:  # the test says which is wrong
                    yield name, arg, wrong, err
                else:
                    yield name, arg, wrong, None


def test_every_registered_class_is_walked():
    classes = registered_classes()
    declared = {name for name, cls in classes.items()
                if 'ARG_SPECS' in vars(cls)}
    assert declared | set(NO_CHECKABLE_ARGS) | set(PENDING) == set(classes)
    assert not declared & (set(NO_CHECKABLE_ARGS) | set(PENDING))
    for name in NO_CHECKABLE_ARGS:  # still true?
        assert '__init__' not in vars(classes[name]), \
            f'{name} now has an __init__ of its own: add its specs'


def test_every_named_argument_has_a_spec():
    """A new constructor argument without a spec fails here."""
    for name, cls in registered_classes().items():
        if 'ARG_SPECS' not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        named = {p.name for p in params if p.name != 'self' and p.kind
                 not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        assert named <= set(specs_of(cls)), \
            f'{name}: no spec for {sorted(named - set(specs_of(cls)))}'


def test_valid_arguments_and_defaults_pass_the_specs():
    from mmpfc.utils.arg_checks import check_values
    for name, cls in registered_classes().items():
        if 'ARG_SPECS' in vars(cls):
            _, args = checked_arguments(cls)
            check_values(name, specs_of(cls), args)  # raises if refused


def test_every_wrong_value_fails_naming_class_argument_and_value():
    silent = []
    for name, arg, wrong, err in walk():
        if err is None:
            silent.append((name, arg, wrong))
            continue
        text = str(err)
        assert isinstance(err, (TypeError, ValueError)), repr(err)
        assert text.startswith(f'{name}: '), text
        assert arg in text and repr(wrong)[:60] in text, text
    assert not silent, f'built with a wrong value: {silent}'


# ---------------------------------------------------- the examples
@pytest.mark.parametrize('cfg, error, named', [
    (dict(type='CombinedMarginLoss', s='64'), TypeError,
     ('scale s', 'number > 0', "got '64' (str)")),
    (dict(type='CombinedMarginLoss', s=-1.0), ValueError,
     ('scale s', '> 0', 'got -1.0')),
    (dict(type='CombinedMarginLoss', m2=math.pi), ValueError,
     ('m2', '[0, pi)', 'got 3.14159')),
    (dict(type='CurricularFaceLoss', m=-0.5), ValueError,
     ('m', '[0, pi)', 'got -0.5')),
    (dict(type='MagFaceLoss', u_a=5.0), ValueError,
     ('u_a', '> l_a=10.0', 'got 5.0')),
    (dict(type='PartialFCHead', num_classes=4, in_channels=8,
          sample_rate=1.5), ValueError,
     ('sample_rate', '[0, 1]', 'got 1.5')),
    (dict(type='PartialFCHead', num_classes=4, in_channels=8,
          num_subcenters=0), ValueError,
     ('num_subcenters', 'int in [1, 255]', 'got 0')),
    (dict(type='PartialFCHead', num_classes=4, in_channels=8,
          reuse_buffer='no'), TypeError,
     ('reuse_buffer', 'True or False or None', "got 'no' (str)")),
])
def test_examples_fail_clearly(cfg, error, named):
    """First the class and the argument, then the allowed values and the
    value given (its type when that is what is wrong)."""
    from mmpfc.registry import MODELS
    key, *rest = named
    with pytest.raises(error) as err:
        MODELS.build(cfg)
    text = assert_mentions(err, *rest)
    assert text.startswith(f"{cfg['type']}: {key} "), text


def test_int8_center_state_needs_an_optimizer_that_updates_rows():
    from mmpfc.registry import OPTIM_WRAPPERS
    params = nn.Linear(2, 2).parameters()
    with pytest.raises(ValueError) as err:
        OPTIM_WRAPPERS.build(dict(
            type='PartialFCOptimWrapper', center_state_dtype='int8',
            optimizer=torch.optim.RMSprop(params, lr=0.1)))
    text = assert_mentions(err, "center_state_dtype='int8'",
                           'SGD, AdamW, Adam', 'RMSprop')
    assert text.startswith('PartialFCOptimWrapper: '), text


def test_a_type_error_is_also_a_value_error():
    """Callers that catch a bad config value as ValueError still do."""
    assert issubclass(ConfigTypeError, TypeError)
    assert issubclass(ConfigTypeError, ValueError)


# ----------------------------------------------------------- the mechanism
@arg_specs(rate=Real(0.0, 1.0, low_open=True), low=Int(low=0),
           high=Int(low=Arg('low'), low_open=True))
def _function(rate: float, low: int = 0, high: int = 1) -> float:
    return rate


@arg_specs(size=Int(low=1))
class _Base:
    def __init__(self, size: int = 1) -> None:
        self.size = size


@arg_specs(scale=Real(low=0.0))
class _Child(_Base):
    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)


def refusal(error, call, *args, **kwargs) -> str:
    """The message of the ``error`` that ``call(*args, **kwargs)`` raises."""
    with pytest.raises(error) as err:
        call(*args, **kwargs)
    return str(err.value)


def test_functions_and_subclasses_are_checked_under_their_own_name():
    assert _function(0.5) == 0.5
    text = refusal(ValueError, _function, 0.0)
    assert text.startswith('_function: rate '), text
    assert_mentions(text, '(0, 1]', 'got 0.0')
    text = refusal(ValueError, _function, 0.5, low=3, high=3)
    assert text.startswith('_function: high '), text
    assert_mentions(text, 'int', '> low=3', 'got 3')
    assert set(specs_of(_Child)) == {'size', 'scale'}
    assert _Child(size=2).size == 2
    # the base's spec, reported under the subclass's name, before any body
    text = refusal(ValueError, _Child, size=0)
    assert text.startswith('_Child: size '), text
    assert_mentions(text, 'int', '>= 1', 'got 0')
    text = refusal(TypeError, _Child, scale='1')
    assert text.startswith('_Child: scale '), text
    assert_mentions(text, 'number', '>= 0', "got '1' (str)")


# -------------------------------------------------- arrays: is-same flags
def _pairs():
    rng = np.random.default_rng(0)
    emb1 = rng.standard_normal((20, 4))
    emb1 /= np.linalg.norm(emb1, axis=1, keepdims=True)
    issame = np.arange(20) % 2 == 0
    emb2 = np.where(issame[:, None], emb1, -emb1)
    return emb1, emb2, issame


def test_evaluate_pairs_takes_bools_or_0_1_integers():
    emb1, emb2, issame = _pairs()
    expected = evaluate_pairs(emb1, emb2, issame, nrof_folds=2)['accuracy']
    as_ints = evaluate_pairs(emb1, emb2, issame.astype(np.int64),
                             nrof_folds=2)['accuracy']
    assert as_ints == expected == 1.0


@pytest.mark.parametrize('flags, error, found', [
    (lambda s: np.where(s, 'True', 'False'), TypeError, 'dtype <U5'),
    (lambda s: list(map(str, s)), TypeError, 'dtype <U5'),
    (lambda s: s.astype(np.float64), TypeError, 'dtype float64'),
    (lambda s: s.astype(np.int64) * 2, ValueError, 'int64 values [0 2]'),
])
def test_evaluate_pairs_refuses_other_flags(flags, error, found):
    emb1, emb2, issame = _pairs()
    with pytest.raises(error) as err:
        evaluate_pairs(emb1, emb2, flags(issame), nrof_folds=2)
    text = assert_mentions(err, 'booleans', '0/1 integers', f'got {found}')
    assert text.startswith('evaluate_pairs: issame '), text


if __name__ == '__main__':
    records = list(walk())
    arguments = {(name, arg) for name, arg, _, _ in records}
    clear = [r for r in records
             if isinstance(r[3], (TypeError, ValueError))
             and str(r[3]).startswith(f'{r[0]}: ') and r[1] in str(r[3])]
    classes = {name for name, _ in arguments}
    print(f'{len(classes)} classes, {len(arguments)} arguments checked, '
          f'{len(records)} wrong values tried, {len(clear)} fail clearly')
