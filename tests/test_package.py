"""House rules of the package, checked on its source: importing it changes
no global state, subpackages import downwards only, functions stay short."""
import ast
import pathlib
import subprocess
import sys

from helpers import ROOT

PACKAGE = pathlib.Path(ROOT) / 'mmpfc'

#: Each subpackage may import the ones of lower layers only.
LAYERS = (
    ('version', 'registry', 'utils'),
    ('datasets', 'evaluation'),
    ('models', ),
    ('checkpoint', ),
    ('engine', ),
    ('apis', 'testing'),
    ('benchmark', ),
)
#: Longest function allowed, ``def`` to last line, docstring included.
MAX_FUNCTION_LINES = 60

GLOBAL_STATE = '''
import warnings
import torch
import torch.nn.modules.module as module
import torch.optim.optimizer as optimizer
import mmengine.runner, mmpretrain.models  # their own import-time changes


def state():
    return dict(
        warning_filters=list(warnings.filters),
        safe_globals=sorted(map(repr, torch.serialization.get_safe_globals())),
        optimizer_hooks=(len(optimizer._global_optimizer_pre_hooks),
                         len(optimizer._global_optimizer_post_hooks)),
        module_hooks=[len(getattr(module, name)) for name in dir(module)
                      if name.startswith('_global_') and
                      name.endswith('hooks')],
        default_dtype=torch.get_default_dtype(),
        threads=torch.get_num_threads(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        anomaly=torch.is_anomaly_enabled(),
        matmul=torch.get_float32_matmul_precision(),
        grad=torch.is_grad_enabled())


before = state()
import mmpfc  # noqa: E402
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
print(changed or 'unchanged')
'''


def test_importing_mmpfc_changes_no_global_state():
    """Warning filters, torch's load allow-list, global optimizer and module
    hooks, and torch's settings are the same before and after the import
    (in a fresh interpreter: this one has imported mmpfc already)."""
    out = subprocess.run([sys.executable, '-c', GLOBAL_STATE],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == 'unchanged', out.stdout


def test_importing_mmpfc_keeps_the_warning_filters_of_its_libraries():
    """``import mmpfc`` first in a process: the filters torch installs when
    it is imported (e.g. for its tracer's warnings) are still there."""
    code = ('import warnings; import {}; '
            'print(sorted(map(repr, warnings.filters)))')
    filters = {}
    for name in ('torch', 'mmpfc'):
        out = subprocess.run([sys.executable, '-c', code.format(name)],
                             capture_output=True, text=True, cwd=ROOT,
                             check=True)
        filters[name] = set(eval(out.stdout))
    assert filters['torch'] <= filters['mmpfc'], \
        filters['torch'] - filters['mmpfc']


def _imported_subpackages(path: pathlib.Path):
    """(line, subpackage) of every ``mmpfc.<subpackage>`` that ``path``
    imports, relative imports resolved, function-level ones included."""
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[:len(parts) - node.level]
                names = ['.'.join(base + ((node.module, ) if node.module
                                          else ()))]
                if not node.module and len(base) == 1:  # from . import x
                    names = [f'mmpfc.{a.name}' for a in node.names]
            else:
                names = [node.module or '']
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            dotted = name.split('.')
            if dotted[0] == 'mmpfc' and len(dotted) > 1:
                yield node.lineno, dotted[1]


def test_subpackages_import_lower_layers_only():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 and path.stem in ('__init__', ):
            continue  # the package root imports everything
        own = parts[0].removesuffix('.py')
        assert own in layer, f'{own}: add it to LAYERS'
        for line, imported in _imported_subpackages(path):
            assert imported in layer, f'{path}:{line}: mmpfc.{imported}'
            if imported != own and layer[imported] >= layer[own]:
                upward.append(f'{path.relative_to(PACKAGE.parent)}:{line} '
                              f'imports mmpfc.{imported}')
    assert not upward, '\n'.join(upward)


def test_functions_are_short():
    """Argument parsers are exempt: a flat list of options reads best."""
    long = []
    for path in sorted(PACKAGE.rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name != 'parse_args':
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f'{path.relative_to(PACKAGE.parent)}:'
                                f'{node.lineno} {node.name}: {lines} lines')
    assert not long, '\n'.join(long)


def test_ci_runs_the_readmes_two_commands():
    """The README's set-up block is the contract; ``.ci/run`` runs exactly
    its commands, the demo included."""
    readme = (PACKAGE.parent / 'README.md').read_text()
    block = readme.split('## Set up and test', 1)[1]
    block = block.split('```shell\n', 1)[1].split('```', 1)[0]
    commands = block.strip().splitlines()
    ci = (PACKAGE.parent / '.ci' / 'run').read_text().splitlines()
    assert len(commands) == 2
    assert commands[0].endswith('bash tools/dist_train.sh '
                                'configs/pfc/mbf_pfc0.1_demo_cpu.py 2 '
                                '--resume')
    assert ci[-2:] == commands
