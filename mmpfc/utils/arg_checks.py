"""Declarative checks of the arguments a config gives a class or function.

A wrong config value should fail when the component is built, naming the
config key, the value and what was expected, not hours later as a silent
wrong result. Each registered class lists what its ``__init__`` accepts::

    @MODELS.register_module()
    @arg_specs(sample_rate=Real(0, 1), num_subcenters=Int(1, 255),
               center_rounding=OneOf('stochastic', 'nearest'))
    class PartialFCHead(...):

and a wrong value raises, before ``__init__`` runs, e.g.
``ValueError: PartialFCHead: sample_rate must be in [0, 1], got 1.5``.
A wrong type raises :class:`ConfigTypeError`, which is a ``TypeError`` and
also a ``ValueError`` (callers that catch a bad config value as
``ValueError`` keep working). Tables are inherited (:func:`specs_of`), and
every spec lists wrong values of its own (:meth:`Spec.wrong_values`), so a
test can walk the registries and try them all.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, TypeVar

import numpy as np

T = TypeVar('T')


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (also a ``ValueError``)."""


class Problem(NamedTuple):
    """Why a value is refused: the error class, what is expected, and
    optionally what was found (default: the value's repr) or a whole
    message of its own (a parse function's)."""
    error: type
    expected: str
    found: Optional[str] = None
    message: Optional[str] = None


class Arg(NamedTuple):
    """A bound that is another argument of the same call (``u_a > l_a``)."""
    name: str


class Spec:
    """What one argument accepts."""

    what = ''  # a few words before the key in messages ('scale s')

    def describe(self, args: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def problem(self, value: Any, args: Mapping[str, Any]
                ) -> Optional[Problem]:
        raise NotImplementedError

    def wrong_values(self, args: Mapping[str, Any]) -> List[Any]:
        """Values this spec refuses (for tests)."""
        raise NotImplementedError

    def _type_problem(self, args: Mapping[str, Any]) -> Problem:
        return Problem(ConfigTypeError, self.describe(args))


def _bound(bound: Any, args: Mapping[str, Any]) -> Any:
    return args[bound.name] if isinstance(bound, Arg) else bound


def _show(bound: Any, args: Mapping[str, Any]) -> str:
    if isinstance(bound, Arg):
        return f'{bound.name}={args[bound.name]!r}'
    return 'pi' if bound == math.pi else f'{bound:g}'


class Real(Spec):
    """A number (not a bool), optionally in a range; NaN is refused by any
    bound. ``low`` and ``high`` may be :class:`Arg`."""

    kind, noun = numbers.Real, 'a number'

    def __init__(self, low: Any = None, high: Any = None,
                 low_open: bool = False, high_open: bool = False,
                 what: str = '') -> None:
        self.low, self.high = low, high
        self.low_open, self.high_open, self.what = low_open, high_open, what

    def range(self, args: Mapping[str, Any]) -> str:
        low, high = self.low, self.high
        if low is not None and high is not None:
            return (f"in {'(' if self.low_open else '['}{_show(low, args)}, "
                    f"{_show(high, args)}{')' if self.high_open else ']'}")
        if low is not None:
            return f"{'>' if self.low_open else '>='} {_show(low, args)}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {_show(high, args)}"
        return ''

    def describe(self, args: Mapping[str, Any]) -> str:
        return f'{self.noun} {self.range(args)}'.rstrip()

    def _in_range(self, value: Any, args: Mapping[str, Any]) -> bool:
        low, high = _bound(self.low, args), _bound(self.high, args)
        above = low is None or (value > low if self.low_open else
                                value >= low)
        below = high is None or (value < high if self.high_open else
                                 value <= high)
        return bool(above and below)

    def problem(self, value, args):
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return self._type_problem(args)
        if not self._in_range(value, args):
            return Problem(ValueError, self.range(args))
        return None

    def wrong_values(self, args):
        wrong = ['1', None, True]
        low, high = _bound(self.low, args), _bound(self.high, args)
        if low is not None:
            wrong.append(low if self.low_open else low - 1)
        if high is not None:
            wrong.append(high if self.high_open else high + 1)
        if low is not None or high is not None:
            wrong.append(math.nan)
        return wrong


class Int(Real):
    """An int (not a bool, not a float), optionally in a range."""

    kind, noun = numbers.Integral, 'an int'

    def problem(self, value, args):
        found = super().problem(value, args)
        if found is not None and found.error is ValueError:
            return Problem(ValueError, self.describe(args))
        return found

    def wrong_values(self, args):
        return [v for v in super().wrong_values(args)
                if not (isinstance(v, float) and math.isnan(v))] + [1.5]


class Bool(Spec):
    """``True`` or ``False`` (a numpy bool too; not 0 or 1)."""

    def describe(self, args):
        return 'True or False'

    def problem(self, value, args):
        if isinstance(value, (bool, np.bool_)):
            return None
        return self._type_problem(args)

    def wrong_values(self, args):
        return ['True', 1, None]


class Str(Spec):
    """A string, non-empty unless ``empty``."""

    def __init__(self, empty: bool = True) -> None:
        self.empty = empty

    def describe(self, args):
        return 'a str' if self.empty else 'a non-empty str'

    def problem(self, value, args):
        if not isinstance(value, str):
            return self._type_problem(args)
        if not value and not self.empty:
            return Problem(ValueError, self.describe(args))
        return None

    def wrong_values(self, args):
        return [1, None] + ([] if self.empty else [''])


class OneOf(Spec):
    """One of a few values (compared with ``==``)."""

    def __init__(self, *choices: Any) -> None:
        self.choices = choices

    def describe(self, args):
        if len(self.choices) == 1:
            return repr(self.choices[0])
        return f'one of {list(self.choices)}'

    def problem(self, value, args):
        # same type: 50.0 is no IResNet depth, True no choice of 1
        if any(type(value) is type(c) and value == c for c in self.choices):
            return None
        return Problem(ValueError, self.describe(args))

    def wrong_values(self, args):
        first = self.choices[0]
        other = f'no-{first}' if isinstance(first, str) else \
            max(self.choices) + 1
        return [other, None]


def _type_name(kind: type) -> str:
    if kind is Callable:
        return 'callable'
    if kind.__module__ == 'builtins':
        return kind.__name__
    if kind.__module__.startswith('torch.nn'):
        return f'nn.{kind.__name__}'
    return f"{kind.__module__.split('.')[0]}.{kind.__name__}"


class Instance(Spec):
    """An instance of one of ``types`` (``Callable``: anything callable)."""

    def __init__(self, *types: type) -> None:
        self.types = types

    def describe(self, args):
        return 'a ' + ' or '.join(_type_name(t) for t in self.types)

    def problem(self, value, args):
        if isinstance(value, self.types):
            return None
        return self._type_problem(args)

    def wrong_values(self, args):
        return [object(), None]


class Seq(Spec):
    """A list or tuple (not a str) of ``length`` items (any number when
    None), each accepted by ``item``."""

    def __init__(self, item: Spec, length: Optional[int] = None) -> None:
        self.item, self.length = item, length

    def describe(self, args):
        size = '' if self.length is None else f' of {self.length}'
        return (f'a list or tuple{size}, each item '
                f'{self.item.describe(args)}')

    def problem(self, value, args):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return self._type_problem(args)
        if self.length is not None and len(value) != self.length:
            return Problem(ValueError, self.describe(args))
        for item in value:
            inner = self.item.problem(item, args)
            if inner is not None:
                return Problem(inner.error, self.describe(args))
        return None

    def wrong_values(self, args):
        bad_item = self.item.wrong_values(args)[0]
        return [5, 'abc', [bad_item] * (self.length or 1), None]


class AnyOf(Spec):
    """Accepted by any of ``specs``; a ``ValueError`` when the value has the
    type of one of them (only out of its range), else a type error."""

    def __init__(self, *specs: Spec) -> None:
        self.specs = specs

    def describe(self, args):
        return ' or '.join(s.describe(args) for s in self.specs)

    def problem(self, value, args):
        found = [s.problem(value, args) for s in self.specs]
        if any(p is None for p in found):
            return None
        error = ValueError if any(p.error is ValueError for p in found) \
            else ConfigTypeError
        return Problem(error, self.describe(args))

    def wrong_values(self, args):
        wrong = [v for s in self.specs for v in s.wrong_values(args)]
        return [v for v in wrong if self.problem(v, args) is not None]


class Opt(Spec):
    """None, or what ``spec`` accepts."""

    def __init__(self, spec: Spec) -> None:
        self.spec, self.what = spec, spec.what

    def describe(self, args):
        return f'{self.spec.describe(args)} or None'

    def problem(self, value, args):
        if value is None:
            return None
        found = self.spec.problem(value, args)
        if found is None or found.message:
            return found
        return found._replace(expected=f'{found.expected} or None')

    def wrong_values(self, args):
        return [v for v in self.spec.wrong_values(args) if v is not None]


class Parsed(Spec):
    """What ``parse(value)`` accepts; its own error message is kept (after
    the owner's name). For values with a parser and message of their own,
    e.g. dtype names. ``wrong`` lists values it refuses."""

    def __init__(self, parse: Callable[[Any], Any], wrong: Sequence) -> None:
        self.parse, self.wrong = parse, list(wrong)

    def describe(self, args):
        return f'accepted by {self.parse.__name__}'

    def problem(self, value, args):
        try:
            self.parse(value)
        except (TypeError, ValueError) as err:
            return Problem(type(err), self.describe(args), message=str(err))
        return None

    def wrong_values(self, args):
        return list(self.wrong)


class Flags(Spec):
    """An array of booleans or of 0/1 integers (strings such as 'False'
    would otherwise all become True)."""

    def describe(self, args):
        return 'booleans or 0/1 integers'

    def problem(self, value, args):
        array = np.asarray(value)
        if array.dtype.kind == 'b':
            return None
        if array.dtype.kind not in 'iu':
            return Problem(ConfigTypeError, self.describe(args),
                           found=f'dtype {array.dtype}')
        values = np.unique(array)
        if not np.isin(values, (0, 1)).all():
            return Problem(ValueError, self.describe(args),
                           found=f'{array.dtype} values {values[:5]}')
        return None

    def wrong_values(self, args):
        return [np.array(['True', 'False']), np.array([0.0, 1.0]),
                np.array([0, 2])]


#: Shapes many configs share: MMEngine's ``init_cfg``, a transform list.
INIT_CFG = Opt(Instance(dict, list))
PIPELINE = Seq(Instance(dict, Callable))


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + '...'


def format_message(owner: str, name: str, spec: Spec, value: Any,
                   problem: Problem) -> str:
    """``'<owner>: <name> must be <expected>, got <value>'``."""
    if problem.message:
        return f'{owner}: {problem.message}'
    key = f'{spec.what} {name}'.lstrip()
    found = problem.found or _shorten(repr(value))
    if problem.found is None and problem.error is ConfigTypeError:
        found += f' ({type(value).__name__})'
    return f'{owner}: {key} must be {problem.expected}, got {found}'


def check_values(owner: str, specs: Mapping[str, Spec],
                 args: Mapping[str, Any]) -> None:
    """Raise for the first value of ``args`` its spec refuses."""
    for name, spec in specs.items():
        if name in args:
            value = args[name]
            problem = spec.problem(value, args)
            if problem is not None:
                raise problem.error(
                    format_message(owner, name, spec, value, problem))


def specs_of(target: Any) -> Dict[str, Spec]:
    """The specs of a decorated function, or of a class with its bases'."""
    if not isinstance(target, type):
        return dict(getattr(target, 'ARG_SPECS', {}))
    merged: Dict[str, Spec] = {}
    for klass in reversed(target.__mro__):
        merged.update(vars(klass).get('ARG_SPECS', {}))
    return merged


def bound_arguments(signature: inspect.Signature, args: tuple,
                    kwargs: dict) -> Optional[Dict[str, Any]]:
    """The call's arguments by name, defaults included and ``**kwargs``
    spread out; None when they do not fit the signature."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None  # the call itself raises its own error
    bound.apply_defaults()
    values = dict(bound.arguments)
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            values = {**values.pop(param.name), **values}
    return values


def arg_specs(**specs: Spec) -> Callable[[T], T]:
    """Check the arguments of a class's ``__init__`` (decorating the
    class) or of a function, before it runs."""

    def decorate(target):
        is_class = isinstance(target, type)
        if is_class and '__init__' not in vars(target):
            raise TypeError(f'arg_specs: {target.__name__} has no __init__ '
                            'of its own whose arguments it could check')
        target.ARG_SPECS = dict(specs)
        # a class checks its bases' specs too (for the arguments it takes)
        func = target.__dict__['__init__'] if is_class else target
        table = specs_of(target)
        signature = inspect.signature(func)

        @functools.wraps(func)
        def checked(*args, **kwargs):
            values = bound_arguments(signature, args, kwargs)
            if values is not None:
                owner = type(args[0]).__name__ if is_class else \
                    target.__name__
                check_values(owner, table, values)
            return func(*args, **kwargs)

        if is_class:
            target.__init__ = checked
            return target
        return checked

    return decorate
