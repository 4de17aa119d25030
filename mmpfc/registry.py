"""Child registries of MMEngine's roots, scope ``mmpfc``.

Every registry names the package that fills it (``locations``), so a config
from any OpenMMLab project can say ``type='mmpfc.PartialFCHead'`` after
``custom_imports=dict(imports=['mmpfc'])`` and the class is found.
"""
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOG_PROCESSORS as MMENGINE_LOG_PROCESSORS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import Registry

_SCOPE = 'mmpfc'

RUNNERS = Registry('runner', parent=MMENGINE_RUNNERS, scope=_SCOPE,
                   locations=['mmpfc.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, scope=_SCOPE,
                 locations=['mmpfc.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope=_SCOPE,
                 locations=['mmpfc.engine'])
LOG_PROCESSORS = Registry('log processor', parent=MMENGINE_LOG_PROCESSORS,
                          scope=_SCOPE, locations=['mmpfc.engine'])
OPTIMIZERS = Registry('optimizer', parent=MMENGINE_OPTIMIZERS, scope=_SCOPE,
                      locations=['mmpfc.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS,
                          scope=_SCOPE, locations=['mmpfc.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, scope=_SCOPE,
    locations=['mmpfc.engine'])
PARAM_SCHEDULERS = Registry('parameter scheduler',
                            parent=MMENGINE_PARAM_SCHEDULERS, scope=_SCOPE,
                            locations=['mmpfc.engine'])
MODELS = Registry('model', parent=MMENGINE_MODELS, scope=_SCOPE,
                  locations=['mmpfc.models'])
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS,
                          scope=_SCOPE, locations=['mmpfc.engine'])
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope=_SCOPE,
                    locations=['mmpfc.datasets'])
DATA_SAMPLERS = Registry('data sampler', parent=MMENGINE_DATA_SAMPLERS,
                         scope=_SCOPE, locations=['mmpfc.datasets'])
# collate functions: a config names them with the scope, e.g.
# collate_fn=dict(type='mmpfc.face_collate') (MMEngine's Runner looks an
# unscoped name up in its own root registry only)
FUNCTIONS = Registry('function', parent=MMENGINE_FUNCTIONS, scope=_SCOPE,
                     locations=['mmpfc.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope=_SCOPE,
                      locations=['mmpfc.datasets'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, scope=_SCOPE,
                   locations=['mmpfc.evaluation'])
EVALUATOR = Registry('evaluator', parent=MMENGINE_EVALUATOR, scope=_SCOPE,
                     locations=['mmpfc.evaluation'])
VISBACKENDS = Registry('vis_backend', parent=MMENGINE_VISBACKENDS,
                       scope=_SCOPE, locations=['mmpfc.engine'])
VISUALIZERS = Registry('visualizer', parent=MMENGINE_VISUALIZERS,
                       scope=_SCOPE, locations=['mmpfc.engine'])
