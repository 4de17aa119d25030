from .memory_table_hook import (MemoryTableHook, format_memory_table,
                                rank_memory)
from .speed_log_hook import SpeedLogHook, format_speed_line

__all__ = ['MemoryTableHook', 'SpeedLogHook', 'format_memory_table',
           'format_speed_line', 'rank_memory']
