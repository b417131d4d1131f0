"""Record formats, loaders and adapters for real public datasets (docs/data_formats.md)."""
from rlhf.data.formats import (MAX_K, MIN_K, RECORD_TYPES, Comparison, Demonstration, PromptRecord,
                               Record, RecordError, TextRecord, record_from_dict)
from rlhf.data.loaders import DataError, LoadResult, load_records, load_records_with_stats, write_jsonl

__all__ = [
    "MAX_K", "MIN_K", "RECORD_TYPES", "Comparison", "DataError", "Demonstration", "LoadResult",
    "PromptRecord", "Record", "RecordError", "TextRecord", "load_records", "load_records_with_stats",
    "record_from_dict", "write_jsonl",
]
