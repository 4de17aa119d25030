from .memory_table_hook import (MemoryTableHook, format_memory_table,
                                rank_memory)
from .speed_log_hook import SpeedLogHook, format_speed_line
from .training_health_hook import TrainingDivergedError, TrainingHealthHook

__all__ = ['MemoryTableHook', 'SpeedLogHook', 'TrainingDivergedError',
           'TrainingHealthHook', 'format_memory_table', 'format_speed_line',
           'rank_memory']
