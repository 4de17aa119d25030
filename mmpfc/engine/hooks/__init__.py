from .checkpoint_hook import CheckpointHook
from .memory_table_hook import (MemoryTableHook, format_memory_table,
                                rank_memory)
from .preemption_hook import (PREEMPTED_EXIT_CODE, PreemptionHook,
                              TrainingPreempted)
from .speed_log_hook import SpeedLogHook, format_speed_line
from .training_health_hook import TrainingDivergedError, TrainingHealthHook

__all__ = ['CheckpointHook', 'MemoryTableHook', 'PREEMPTED_EXIT_CODE',
           'PreemptionHook',
           'SpeedLogHook', 'TrainingPreempted', 'TrainingDivergedError',
           'TrainingHealthHook', 'format_memory_table', 'format_speed_line',
           'rank_memory']
