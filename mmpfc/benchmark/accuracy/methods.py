"""Head configurations of the accuracy benchmark, from strings or dicts.

A method is a head plus, optionally, extra arguments of the head and of the
optim wrapper, so that a storage variant is one more entry::

    dp                                   MarginSoftmaxHead (data parallel)
    mp                                   PartialFCHead(sample_rate=1.0)
    pfc0.1                               PartialFCHead(sample_rate=0.1)
    pfc0.1:center_dtype=bfloat16         + head kwarg center_dtype='bfloat16'
    pfc0.1:optim.center_state_dtype=int8 + optim wrapper kwarg
    pfc0.1:init_std=0.02:label=PFC0.1-a  several options; a custom label

Without ``label`` a method with options is labelled by them, e.g.
``PFC0.1:center_dtype=bfloat16``; labels must be unique.

After the base name, ``:``-separated ``KEY=VALUE`` options: ``label`` names
the table row, ``optim.KEY`` (or ``optim_wrapper.KEY``) goes to the optim
wrapper config, ``head.KEY`` or a bare ``KEY`` to the head config. A value
is read as a Python literal when it is one (``0.02``, ``True``,
``(1, 2)``), else kept as a string (``bfloat16``). The kwargs are passed
through unchanged: a head or wrapper that does not know one raises when it
is built (``check_methods`` builds each method once before the runs).

The same as a dict (also a JSON object on the command line)::

    dict(name='pfc0.1', label='PFC0.1-bf16',
         head=dict(center_dtype='bfloat16'),
         optim_wrapper=dict(center_state_dtype='int8'))
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import List, Sequence, Union

from ..head_methods import parse_method

MethodLike = Union[str, dict, 'MethodSpec']
OPTIM_PREFIXES = ('optim.', 'optim_wrapper.')


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a head and its extra kwargs.

    Attributes:
        label: Name of the row (``DP``, ``MP``, ``PFC0.1``, or custom).
        name: The base name it was made from (``dp``, ``mp``, ``pfc0.1``).
        head: Head config: ``type`` (``MarginSoftmaxHead`` or
            ``PartialFCHead``), ``sample_rate`` for the latter, and the
            extra kwargs.
        optim_wrapper: Extra kwargs of the ``PartialFCOptimWrapper``
            config.
    """
    label: str
    name: str
    head: dict
    optim_wrapper: dict = field(default_factory=dict)


def _literal(text: str):
    """``text`` as a Python literal, or the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _base(name: str) -> tuple:
    """(label, head config) of ``dp``, ``mp`` or ``pfc<rate>``."""
    method = parse_method(name)  # raises naming the value and the choices
    if not method.sharded:
        return method.label, dict(type='MarginSoftmaxHead')
    return method.label, dict(type='PartialFCHead',
                              sample_rate=method.sample_rate)


def _label(base: str, options: List[str]) -> str:
    """The default label: the base name's, then the options."""
    return ':'.join([base, *options])


def parse_method_spec(spec: MethodLike) -> MethodSpec:
    """A :class:`MethodSpec` from a string or dict (see the module doc)."""
    if isinstance(spec, MethodSpec):
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - {'name', 'label', 'head', 'optim_wrapper'}
        if 'name' not in spec or unknown:
            raise ValueError(
                f'method {spec!r}: expected a dict with a "name" (dp, mp or '
                'pfc<rate>) and optional "label", "head" and '
                f'"optim_wrapper" dicts; got keys {sorted(spec)}')
        for key in ('head', 'optim_wrapper'):
            if not isinstance(spec.get(key, {}), dict):
                raise ValueError(f'method {spec!r}: "{key}" must be a dict '
                                 f'of kwargs, got {spec[key]!r}')
        label, head = _base(str(spec['name']))
        extra = [f'{k}={v}' for k, v in spec.get('head', {}).items()] + [
            f'optim.{k}={v}' for k, v in spec.get('optim_wrapper', {}).items()]
        return MethodSpec(label=str(spec.get('label', _label(label, extra))),
                          name=str(spec['name']).strip().lower(),
                          head={**head, **spec.get('head', {})},
                          optim_wrapper=dict(spec.get('optim_wrapper', {})))
    if not isinstance(spec, str):
        raise ValueError(f'method {spec!r}: expected a string such as '
                         "'pfc0.1:center_dtype=bfloat16' or a dict")
    name, *options = spec.strip().split(':')
    label, head = _base(name)
    label = _label(label, [o.strip() for o in options
                           if not o.strip().startswith('label=')])
    optim = {}
    for option in options:
        key, sep, value = option.partition('=')
        key = key.strip()
        if not sep or not key:
            raise ValueError(f'method {spec!r}: option {option!r} is not '
                             'KEY=VALUE (e.g. pfc0.1:center_dtype=bfloat16)')
        if key == 'label':
            label = value.strip()
        elif key.startswith(OPTIM_PREFIXES):
            optim[key.split('.', 1)[1]] = _literal(value.strip())
        else:
            head[key[len('head.'):] if key.startswith('head.') else key] = \
                _literal(value.strip())
    return MethodSpec(label=label, name=name.strip().lower(), head=head,
                      optim_wrapper=optim)


def parse_methods(specs: Union[str, Sequence[MethodLike]]
                  ) -> List[MethodSpec]:
    """Methods from a comma list (``'dp,mp,pfc0.1'``), a JSON list of
    strings and objects (``'[\"mp\", {\"name\": \"pfc0.1\"}]'``) or a
    Python list of strings, dicts and specs; labels must be unique."""
    if isinstance(specs, str):
        text = specs.strip()
        if text.startswith('['):
            try:
                specs = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f'--methods {text!r} starts with "[" but is '
                                 f'not a JSON list: {err}') from err
        else:
            specs = [s for s in text.split(',') if s.strip()]
    methods = [parse_method_spec(s) for s in specs]
    if not methods:
        raise ValueError('no methods given; expected e.g. dp,mp,pfc0.1')
    labels = [m.label for m in methods]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f'methods {labels}: the labels {duplicates} repeat; '
                         'give each a label=NAME option')
    return methods
