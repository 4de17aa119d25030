"""The manifest of an mmpfc checkpoint: ``meta['mmpfc']`` of its main file.

It says how the sharded tensors of the checkpoint are stored: the format
version, the mmpfc version, the layout (``'shards'``: one file per rank in a
shard folder; ``'inline'``: the full (C, D) tensors are in ``state_dict`` and
``optimizer``, as in a merged or imported file), the world size, the shard
folder, its token, file sizes and checksums, and for every sharded parameter
a :class:`ParamEntry`.

On disk the manifest is a plain dict (``Manifest.to_dict``), so a checkpoint
needs nothing of mmpfc to be read; :meth:`Manifest.from_dict` checks every
field and names the file and the field that is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from mmpfc.models.utils.low_precision import dtype_name
from mmpfc.version import __version__

from .checksum import is_checksum
from .errors import CheckpointError

FORMAT = 'mmpfc-sharded-checkpoint'
FORMAT_VERSION = 1
MANIFEST_KEY = 'mmpfc'
LAYOUTS = ('shards', 'inline')

# (key of the optimizer in an OptimWrapperDict, or '', index of the param)
OptimizerLocation = Tuple[str, int]
ClassRange = Tuple[int, int]
_REQUIRED = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_positive(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_str_list(value: Any) -> bool:
    return _is_list(value) and all(isinstance(v, str) for v in value)


def _is_location(value: Any) -> bool:
    return value is None or (_is_list(value) and len(value) == 2 and
                             _is_str(value[0]) and _is_count(value[1]))


def _is_range_list(value: Any) -> bool:
    return _is_list(value) and all(
        _is_list(r) and len(r) == 2 and all(map(_is_count, r))
        for r in value)


class _Fields:
    """Reads the fields of one dict of a manifest; errors name the file and
    the field (``meta['mmpfc']['params']['head.weight']['num_classes']``)."""

    def __init__(self, data: Any, path: str, where: str) -> None:
        self.path, self.where = path, where
        if not isinstance(data, Mapping):
            raise self.error(f'{where} must be a dict, got '
                             f'{type(data).__name__}')
        self.data = data

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f'checkpoint {self.path}: {message}')

    def name(self, key: str) -> str:
        return f'{self.where}[{key!r}]'

    def get(self, key: str, check: Callable[[Any], bool], expected: str,
            default: Any = _REQUIRED) -> Any:
        """``data[key]`` if ``check`` accepts it; ``default`` if absent."""
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(f'manifest field {self.name(key)} is '
                                 f'missing (expected {expected})')
            return default
        value = self.data[key]
        if not check(value):
            raise self.error(f'manifest field {self.name(key)} must be '
                             f'{expected}, got {value!r} '
                             f'({type(value).__name__})')
        return value


@dataclass(frozen=True)
class ParamEntry:
    """How one sharded parameter (a (C, D) matrix of class rows) is stored.

    Attributes:
        num_classes: C, the rows of the whole matrix.
        embedding_size: D.
        class_ranges: ``(start, stop)`` of the rows every rank saved, in
            rank order; together they cover ``[0, C)``.
        dtype: Of the saved rows (``'float32'``...); informative.
        optimizer: Where its state sits in the checkpoint's optimizer state
            dict (``(key, index)``, key ``''`` for a single optimizer), or
            None when no optimizer state was saved for it.
        row_state: Names of its optimizer state tensors with one row per
            class (``momentum_buffer``, ``exp_avg``...).
    """
    num_classes: int
    embedding_size: int
    class_ranges: Tuple[ClassRange, ...]
    dtype: Optional[str] = None
    optimizer: Optional[OptimizerLocation] = None
    row_state: Tuple[str, ...] = ()

    @classmethod
    def of_matrix(cls, tensor) -> 'ParamEntry':
        """The entry of a whole (C, D) ``tensor`` held in one piece."""
        classes, dim = (int(n) for n in tensor.shape)
        return cls(num_classes=classes, embedding_size=dim,
                   class_ranges=((0, classes), ),
                   dtype=dtype_name(tensor.dtype))

    def whole(self) -> 'ParamEntry':
        """This entry for the full matrix held in one piece (``inline``)."""
        return replace(self, class_ranges=((0, self.num_classes), ))

    def to_dict(self) -> dict:
        """The entry as stored in ``meta['mmpfc']['params'][name]``."""
        return dict(
            num_classes=self.num_classes,
            embedding_size=self.embedding_size, dtype=self.dtype,
            optimizer=None if self.optimizer is None else list(
                self.optimizer),
            row_state=list(self.row_state),
            class_ranges=[list(r) for r in self.class_ranges])

    @classmethod
    def from_dict(cls, data: Any, path: str, name: str) -> 'ParamEntry':
        """Check and read the stored entry of parameter ``name`` of the
        checkpoint ``path``; a :class:`CheckpointError` names the field."""
        fields = _Fields(data, path,
                         f'meta[{MANIFEST_KEY!r}]' + f"['params'][{name!r}]")
        classes = fields.get('num_classes', _is_positive, 'an int > 0')
        entry = cls(
            num_classes=classes,
            embedding_size=fields.get('embedding_size', _is_positive,
                                      'an int > 0'),
            class_ranges=tuple(tuple(r) for r in fields.get(
                'class_ranges', _is_range_list,
                'a list of [start, stop] pairs')),
            dtype=fields.get('dtype', _is_optional_str, 'a str', None),
            optimizer=_location(fields.get(
                'optimizer', _is_location, 'None or [key, index]', None)),
            row_state=tuple(fields.get('row_state', _is_str_list,
                                       'a list of str', ())))
        stops = [0] + [stop for _, stop in entry.class_ranges]
        if [start for start, _ in entry.class_ranges] != stops[:-1] or \
                stops[-1] != classes or any(
                    b < a for a, b in zip(stops, stops[1:])):
            raise fields.error(
                f'manifest field {fields.name("class_ranges")} must be '
                f'contiguous ranges covering [0, {classes}), got '
                f'{[list(r) for r in entry.class_ranges]}')
        return entry


def _location(value: Optional[list]) -> Optional[OptimizerLocation]:
    return None if value is None else (value[0], value[1])


@dataclass(frozen=True)
class Manifest:
    """``meta['mmpfc']``: how the sharded tensors of a checkpoint are stored.

    Attributes:
        layout: ``'shards'`` (one file per rank in ``shard_dir``) or
            ``'inline'`` (full tensors in ``state_dict`` / ``optimizer``).
        world_size: Ranks that saved the shards (1 for ``inline``).
        params: The :class:`ParamEntry` of every sharded state-dict key.
        shard_dir: Shard folder, relative to the main file's folder.
        token: Id written into every shard file of this checkpoint.
        shard_bytes: Size of every rank's shard file.
        shard_checksums: Checksum of every rank's shard file
            (:mod:`.checksum`); None in checkpoints written before them.
        samplers: Modules whose sampler RNG state the shards hold.
        format_version: Of the checkpoint format; newer ones are refused.
        mmpfc_version: Of the mmpfc that wrote the file.
    """
    layout: str
    world_size: int
    params: Dict[str, ParamEntry]
    shard_dir: Optional[str] = None
    token: Optional[str] = None
    shard_bytes: Optional[Tuple[int, ...]] = None
    shard_checksums: Optional[Tuple[str, ...]] = None
    samplers: Tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    mmpfc_version: Optional[str] = __version__

    @classmethod
    def inline(cls, params: Dict[str, ParamEntry]) -> 'Manifest':
        """The manifest of a file holding every sharded tensor whole."""
        return cls(layout='inline', world_size=1,
                   params={k: v.whole() for k, v in params.items()})

    def to_dict(self) -> dict:
        """The manifest as stored in ``meta['mmpfc']`` (plain Python)."""
        return dict(
            format=FORMAT, format_version=self.format_version,
            mmpfc_version=self.mmpfc_version, layout=self.layout,
            world_size=self.world_size, shard_dir=self.shard_dir,
            token=self.token,
            shard_bytes=None if self.shard_bytes is None else list(
                self.shard_bytes),
            shard_checksums=None if self.shard_checksums is None else list(
                self.shard_checksums),
            params={k: v.to_dict() for k, v in self.params.items()},
            samplers=list(self.samplers))

    @classmethod
    def from_dict(cls, data: Any, path: str) -> 'Manifest':
        """Check and read ``meta['mmpfc']`` of the checkpoint ``path``.

        Refuses (:class:`CheckpointError` naming ``path`` and the field) a
        dict that is no mmpfc manifest, one of a newer format, a missing
        field or one of the wrong type, and ranges or sizes that disagree
        with the world size.
        """
        fields = _Fields(data, path, f'meta[{MANIFEST_KEY!r}]')
        if data.get('format') != FORMAT:
            raise fields.error(f'meta[{MANIFEST_KEY!r}] is not an mmpfc '
                               f'manifest (format {data.get("format")!r}, '
                               f'expected {FORMAT!r})')
        version = fields.get('format_version', _is_count, 'an int >= 0')
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f'{path} was written by mmpfc {data.get("mmpfc_version")} '
                f'in checkpoint format {version}; this mmpfc '
                f'({__version__}) reads format <= {FORMAT_VERSION}')
        layout = fields.get('layout', lambda v: v in LAYOUTS,
                            f'one of {LAYOUTS}')
        world_size = fields.get('world_size', _is_positive, 'an int > 0')
        shards = layout == 'shards'
        default = _REQUIRED if shards else None
        shard_bytes = fields.get(
            'shard_bytes', lambda v: v is None or (
                _is_list(v) and len(v) == world_size and
                all(map(_is_count, v))),
            f'None or {world_size} sizes (one per rank)', None)
        shard_checksums = fields.get(
            'shard_checksums', lambda v: v is None or (
                _is_list(v) and len(v) == world_size and
                all(map(is_checksum, v))),
            f"None or {world_size} checksums (one per rank, "
            "'<algorithm>:<hex>')", None)
        raw_params = fields.get('params', lambda v: isinstance(v, Mapping),
                                'a dict')
        manifest = cls(
            layout=layout, world_size=world_size,
            params={name: ParamEntry.from_dict(entry, path, name)
                    for name, entry in raw_params.items()},
            shard_dir=fields.get('shard_dir', _is_str if shards else
                                 _is_optional_str, 'a str', default),
            token=fields.get('token', _is_str if shards else
                             _is_optional_str, 'a str', default),
            shard_bytes=None if shard_bytes is None else tuple(shard_bytes),
            shard_checksums=None if shard_checksums is None else tuple(
                shard_checksums),
            samplers=tuple(fields.get('samplers', _is_str_list,
                                      'a list of str', ())),
            format_version=version,
            mmpfc_version=fields.get('mmpfc_version', _is_optional_str,
                                     'a str', None))
        for name, entry in manifest.params.items():
            if len(entry.class_ranges) != world_size:
                raise fields.error(
                    f'manifest field {fields.name("params")}[{name!r}]'
                    f"['class_ranges'] has {len(entry.class_ranges)} "
                    f'ranges, expected one per rank ({world_size})')
        return manifest


def get_manifest(checkpoint: Any, path: str) -> Optional[Manifest]:
    """The manifest of a loaded checkpoint, or None for a plain checkpoint
    (one without ``meta['mmpfc']``)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    data = meta.get(MANIFEST_KEY) if isinstance(meta, dict) else None
    return None if data is None else Manifest.from_dict(data, path)


def set_manifest(checkpoint: dict, manifest: Manifest) -> None:
    """Store ``manifest`` in ``checkpoint['meta']`` (created if missing)."""
    checkpoint.setdefault('meta', {})[MANIFEST_KEY] = manifest.to_dict()
