from .collate import face_collate
from .encoded_batch import EncodedBatch, encoded_face_collate
from .face_verification_dataset import (VERIFICATION_META_KEYS,
                                        FaceVerificationDataset,
                                        load_pairs_bin)
from .image_folder import FaceImageFolder
from .mx_face_dataset import MXFaceDataset, read_property
from .recordio import (IndexedRecordReader, IndexedRecordWriter, RecordIOError,
                       pack_record, unpack_record)
from .synthetic_face_dataset import SyntheticFaceDataset
from .transforms import FlipIfRequested, LoadImageFromBytes, RandomFlipInPlace

__all__ = [
    'EncodedBatch', 'encoded_face_collate', 'FaceImageFolder',
    'FaceVerificationDataset', 'FlipIfRequested',
    'IndexedRecordReader', 'IndexedRecordWriter', 'LoadImageFromBytes',
    'MXFaceDataset', 'RandomFlipInPlace', 'RecordIOError',
    'SyntheticFaceDataset', 'VERIFICATION_META_KEYS', 'face_collate',
    'load_pairs_bin', 'pack_record', 'read_property', 'unpack_record'
]
