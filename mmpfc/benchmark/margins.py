"""The margins the benchmark can put on the sharded head, by name.

``--margin arcface,curricularface`` runs every sharded method (MP, PFC)
once per margin, labelled e.g. ``PFC0.1 CurricularFace``; ArcFace (the
head's default loss) keeps the plain label and builds exactly the head it
always did, so earlier tables stay comparable. Each margin has the
authors' defaults, as in ``configs/margins/r50_*.py``.

The head-only benchmark feeds random embeddings whose norms are all close
to ``sqrt(D)``; a margin that reads the norms (AdaFace, MagFace) gets them
rescaled to norms spread over :data:`NORM_RANGE`, as a trained backbone's
are, so that its margin actually varies from row to row.

``subcenter<K>`` (e.g. ``subcenter3``) is ArcFace on a head with K centers
per identity (``PartialFCHead(num_subcenters=K)``): its shard holds K x C
rows, so it is compared with an ArcFace row of K x C identities, which the
benchmark adds. Where the head does not take ``num_subcenters`` the row is
reported as not available.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Optional, Tuple

#: Norms the embeddings of a norm-based margin are rescaled to (uniform per
#: row): a trained backbone's raw features lie in this range (MagFace's
#: magnitudes between l_a = 10 and u_a = 110, AdaFace's running mean
#: starting at 20).
NORM_RANGE = (20.0, 60.0)
DEFAULT_MARGIN = 'arcface'


@dataclass
class MarginSpec:
    """One benchmark margin.

    Attributes:
        name: The command-line name (``'curricularface'``).
        label: What the row label gets (``''`` for ArcFace: plain labels).
        loss: The head's ``loss`` config, None for the head's default
            (ArcFace, ``CombinedMarginLoss`` s=64 m2=0.5).
        num_subcenters: Centers per identity (1: the plain head).
        uses_norms: The margin reads the raw embedding norms.
        modifies_non_target: The margin changes non-target logits too (the
            step keeps their (S, N) slope for backward).
    """
    name: str
    label: str
    loss: Optional[dict] = None
    num_subcenters: int = 1
    uses_norms: bool = False
    modifies_non_target: bool = False

    @property
    def embedding_norms(self) -> Optional[Tuple[float, float]]:
        """The norm range of the head-only embeddings, None to keep them."""
        return NORM_RANGE if self.uses_norms else None


#: The authors' defaults (configs/margins/r50_*.py).
MARGIN_LOSSES = {
    'curricularface': dict(type='CurricularFaceLoss', s=64.0, m=0.5,
                           t_alpha=0.01),
    'adaface': dict(type='AdaFaceLoss', s=64.0, m=0.4, h=0.333,
                    t_alpha=0.01),
    'magface': dict(type='MagFaceLoss', s=64.0, l_a=10.0, u_a=110.0,
                    l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True),
    'elasticface': dict(type='ElasticFaceLoss', s=64.0, m=0.5, std=0.05,
                        kind='arc'),
}
LABELS = {'arcface': '', 'curricularface': 'CurricularFace',
          'adaface': 'AdaFace', 'magface': 'MagFace',
          'elasticface': 'ElasticFace'}
MARGIN_NAMES = ('arcface', *MARGIN_LOSSES, 'subcenter3')


def _margin_class(loss: dict):
    from mmpfc.registry import MODELS  # mmpfc's import registered them
    return MODELS.get(loss['type'])


def parse_margin(text: str) -> MarginSpec:
    """``'arcface'``, ``'curricularface'``, ``'adaface'``, ``'magface'``,
    ``'elasticface'`` or ``'subcenter<K>'`` (K >= 2) -> its spec."""
    name = text.strip().lower().replace('-', '').replace('_', '')
    if name == 'arcface':
        return MarginSpec(name, '')
    if name in MARGIN_LOSSES:
        loss = MARGIN_LOSSES[name]
        cls = _margin_class(loss)
        return MarginSpec(name, LABELS[name], dict(loss),
                          uses_norms=bool(cls.uses_norms),
                          modifies_non_target=bool(cls.modifies_non_target))
    match = re.fullmatch(r'subcenter(\d+)', name)
    if match and int(match.group(1)) >= 2:
        k = int(match.group(1))
        return MarginSpec(name, f'SubCenter{k}', num_subcenters=k)
    raise ValueError(f'margin {text!r}: expected one of '
                     f"{', '.join(MARGIN_NAMES[:-1])} or subcenter<K> "
                     '(K >= 2, e.g. subcenter3)')


def parse_margins(text: Optional[str]) -> Tuple[MarginSpec, ...]:
    """A comma list of margin names (None: ArcFace only), in order, without
    repeats."""
    if text is None:
        return (parse_margin(DEFAULT_MARGIN), )
    names = [t for t in text.split(',') if t.strip()]
    if not names:
        raise ValueError('--margin: no margin name given')
    specs = {}
    for name in names:
        spec = parse_margin(name)
        specs.setdefault(spec.name, spec)
    return tuple(specs.values())


def subcenters_available() -> bool:
    """True when ``PartialFCHead`` takes ``num_subcenters``."""
    from mmpfc.models.heads import PartialFCHead
    return 'num_subcenters' in inspect.signature(PartialFCHead).parameters


SUBCENTERS_MISSING = ('not available: PartialFCHead does not take '
                      'num_subcenters in this version')
