"""Install mmpfc (``pip install -e .``); pinned dependencies live in
requirements/."""
import os.path as osp

from setuptools import find_packages, setup


def read_requirements(name: str) -> list:
    path = osp.join(osp.dirname(__file__), 'requirements', name)
    with open(path) as f:
        return [line.split('#')[0].strip() for line in f
                if line.split('#')[0].strip()]


def read_version() -> str:
    scope: dict = {}
    with open(osp.join(osp.dirname(__file__), 'mmpfc', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmpfc',
    version=read_version(),
    description='Partial FC for large-scale face recognition on MMEngine',
    packages=find_packages(exclude=('tests', 'configs', 'tools')),
    python_requires='>=3.9',
    install_requires=read_requirements('runtime.txt'),
    extras_require={'tests': read_requirements('tests.txt')},
)
