"""`lowbit bench accuracy` (work in progress in this session)."""


def add_arguments(p):
    p.add_argument("models", nargs="*", default=["smollm2-135m"])


def run_accuracy_bench(args):
    raise NotImplementedError
