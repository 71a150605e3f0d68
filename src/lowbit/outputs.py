"""Where a checkpoint may be written, and how it is put there without destroying anything.

    out = check_output("out/smol-w4", force=False, inputs=[model_path])  # before any work
    staging = make_staging(out)                                            # .smol-w4.lowbit-staging-<pid>-<rand>
    ... write the checkpoint into staging ...
    publish(staging, out, force=False, inputs=[model_path])

Rules:
  - without `force`, an existing output is never touched, and the final move is one
    rename(2) that fails if the destination appeared while we worked (renameat2 with
    RENAME_NOREPLACE);
  - with `force`, only a folder that is a lowbit checkpoint (manifest.json of format
    "lowbit-checkpoint", or a damaged one: lowbit's quantized.safetensors, its
    quantization_config, or a staging marker) may be replaced, and never the input model, the
    current directory or one of its parents, the home folder or /. The replacement is atomic:
    renameat2(RENAME_EXCHANGE) swaps the two folders, then the old one is deleted;
  - staging folders are named `.<output name>.lowbit-staging-<pid>-<random>` in the output's
    parent and hold a marker file (STAGING_MARKER) until they are published, so a run that was
    killed leaves something lowbit recognises: the next run into the same parent deletes those
    whose process is gone (or puts an old checkpoint back where a replace was cut short).

Folders are created with the user's umask (os.mkdir mode 0o777), never 0700 as mkdtemp does.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from lowbit.errors import CheckpointError, ConfigError
from lowbit.marks import (
    CONFIG_FILE,
    MANIFEST,
    PARTIAL_RECORD,
    QUANT_FILE,
    is_lowbit_manifest,
    names_lowbit,
)

log = logging.getLogger(__name__)

STAGING_MARKER = ".lowbit-staging"
# .<name>.lowbit-staging-<pid>-<random>: a folder being written; .<name>.lowbit-replaced-<pid>-<random>:
# an old checkpoint moved aside by the fallback replace (no RENAME_EXCHANGE)
_STAGING = re.compile(r"^\.(?P<name>.+)\.lowbit-(?P<kind>staging|replaced)-(?P<pid>\d+)-[0-9a-f]+$")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# ---------------------------------------------------------------- checks before any work
def check_output(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The output folder `out`, resolved, after checking it can be written as asked.

    Raises ConfigError, writing and deleting nothing, when `out` is a file, exists without
    `force`, may not be replaced (see the module docstring), or its nearest existing parent is not
    a writable folder. Stale staging folders of earlier runs next to `out` are cleaned first.
    """
    given = str(out)
    if not given.strip():
        raise ConfigError("-o is empty; give the checkpoint folder to write")
    out = Path(given).expanduser().resolve()
    if out.parent.is_dir():
        clean_stale(out.parent)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"-o {given}: {out} exists and is not a folder; choose a folder path for the checkpoint")
        if not force:
            raise ConfigError(f"-o {given}: {out} already exists; choose another -o path or pass --force to "
                              "replace it (only a lowbit checkpoint can be replaced)")
        check_replaceable(out, inputs, given)
    else:
        _check_not_protected(out, inputs, given)
    _check_writable(out, given)
    return out


def check_output_file(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike],
                      ours: Callable[[Path], bool], what: str = "file") -> Path:
    """The output file `out`, resolved, after the checks check_output makes for a folder: an
    existing path is replaced only with `force`, only when `ours(path)` says lowbit wrote it, and
    never when it is (or holds) an input."""
    given = str(out)
    if not given.strip():
        raise ConfigError(f"-o is empty; give the {what} to write")
    out = Path(given).expanduser().resolve()
    _check_not_protected(out, inputs, given)
    if out.exists() or out.is_symlink():
        if out.is_dir() or not force:
            raise ConfigError(f"-o {given}: {out} already exists; choose another -o path"
                              + ("" if out.is_dir() else f" or pass --force to replace it (only a {what} lowbit "
                                 "wrote can be replaced)"))
        if not ours(out):
            raise ConfigError(f"-o {given}: {out} was not written by lowbit, so --force will not replace it; "
                              "choose another -o path")
    _check_writable(out, given)
    return out


def check_replaceable(out: Path, inputs: Iterable[str | os.PathLike] = (), given: str | None = None) -> None:
    """ConfigError unless `out` (an existing folder) may be replaced by --force."""
    given = given or str(out)
    _check_not_protected(out, inputs, given)
    if not is_lowbit_folder(out):
        raise ConfigError(f"-o {given}: {out} is not a lowbit checkpoint, so --force will not replace it; "
                          "choose a new -o path or remove that folder yourself")


def _check_not_protected(out: Path, inputs: Iterable[str | os.PathLike], given: str) -> None:
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ConfigError(f"-o {given}: {real} is the current directory or one of its parents; "
                          f"give a new folder for the checkpoint, e.g. -o {cwd / 'checkpoint'}")
    home = Path.home().resolve()
    if real in (home, Path(real.anchor)):
        raise ConfigError(f"-o {given}: {real} is the home folder or the file-system root; give a new folder "
                          "for the checkpoint")
    for p in inputs:
        if p is None:
            continue
        src = Path(p).expanduser().resolve()
        if real == src or real in src.parents:
            raise ConfigError(f"-o {given}: {real} is (or holds) the input model {src}; write the checkpoint "
                              "to another folder")


def _check_writable(out: Path, given: str) -> None:
    """The nearest existing ancestor of `out` is a folder we can create a folder in (tested by doing it:
    os.access answers yes for root whatever the mode, and no on some network file systems)."""
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"-o {given}: {parent} is a file, so the checkpoint folder cannot be created under it")
    probe = parent / f".{out.name}.lowbit-staging-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise ConfigError(f"-o {given}: cannot create folders in {parent} ({e.strerror}); choose a writable "
                          "location for the checkpoint") from None


# ---------------------------------------------------------------- what counts as lowbit's
def is_lowbit_folder(path: Path) -> bool:
    """A lowbit checkpoint (any format version), a damaged one, a staging folder lowbit left, or
    the unfinished folder of a streamed job."""
    if (path / STAGING_MARKER).is_file() or (path / PARTIAL_RECORD).is_file() or (path / QUANT_FILE).is_file() or names_lowbit(path / CONFIG_FILE):
        return True
    return is_lowbit_manifest(path / MANIFEST)  # another tool's manifest.json is no licence to replace


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _marker_host(path: Path) -> str | None:
    try:
        return json.loads((path / STAGING_MARKER).read_text()).get("host")
    except (OSError, ValueError, AttributeError):
        return None


def clean_stale(parent: Path) -> list[Path]:
    """Delete the staging folders in `parent` whose process is gone; an old checkpoint that a
    replace moved aside and never deleted is put back when its place is empty, else deleted.
    Folders of live processes, of other hosts, and anything not recognisably lowbit's stay."""
    cleaned = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return cleaned
    host = socket.gethostname()
    for p in entries:
        m = _STAGING.match(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        if _pid_alive(int(m["pid"])):
            continue
        marker_host = _marker_host(p)
        if marker_host is not None and marker_host != host:  # a pid of another machine (shared file system)
            continue
        empty = not any(p.iterdir())
        if not (empty or is_lowbit_folder(p)):
            continue
        dest = parent / m["name"]
        try:
            being_deleted = (p / STAGING_MARKER).exists()
            if m["kind"] == "replaced" and not (empty or being_deleted or dest.exists() or dest.is_symlink()):
                rename_noreplace(p, dest)
                log.warning("put back %s, which an interrupted replace had moved to %s", dest, p.name)
            else:
                remove_tree(p)
                log.warning("removed %s, left by an interrupted lowbit run (pid %s)", p, m["pid"])
            cleaned.append(p)
        except OSError as e:
            log.warning("could not clean %s: %s", p, e)
    return cleaned


# ---------------------------------------------------------------- staging and publishing
def make_staging(out: Path) -> Path:
    """A new empty staging folder for `out` in its parent (created with parents as needed), with
    the marker that makes it recognisably lowbit's while it is incomplete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = out.parent / f".{out.name}.lowbit-staging-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(staging, 0o777)  # the umask decides, as for any folder the user makes
            break
        except FileExistsError:
            continue
    (staging / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "output": out.name}) + "\n")
    return staging


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back (not thread-safe, hence the /proc read first)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give every file in `folder` the mode a plain open() would (0666 less the umask): some
    writers (safetensors) create their files 0600 whatever the umask says."""
    mode = 0o666 & ~umask()
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the C library or the file system does not have it (the caller
    falls back), OSError for any other failure (EEXIST: dst exists)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move src to dst; FileExistsError if dst exists, however late it appeared.

    Without renameat2 (not Linux, old kernels, some file systems) the fallback checks then
    renames: rename(2) itself refuses a non-empty folder or a file at dst, so only an empty folder
    made in the instant between could be replaced."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def replace_atomically(new: Path, old: Path) -> None:
    """Put folder `new` where folder `old` is, then delete the old one. At every instant `old`'s
    path holds either the old folder or the new one (renameat2 RENAME_EXCHANGE); the fallback
    moves the old folder aside under a name clean_stale recognises, so a crash between its two
    renames is undone by the next run."""
    if _renameat2(new, old, _RENAME_EXCHANGE):
        aside = new  # now names the old checkpoint
    else:
        aside = old.parent / f".{old.name}.lowbit-replaced-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(old, aside)
        try:
            rename_noreplace(new, old)
        except BaseException:
            os.rename(aside, old)
            raise
    try:
        remove_tree(aside)
    except OSError as e:  # the new checkpoint is in place; the next run into this folder cleans this
        log.warning("could not delete the replaced checkpoint %s: %s", aside, e)


def remove_tree(path: Path) -> None:
    """Delete a lowbit folder, marking it first so that a crash part-way still leaves it
    recognisable to clean_stale: the marker goes last."""
    marker = path / STAGING_MARKER
    if not marker.exists():
        marker.write_text("{}\n")
    for child in path.iterdir():
        if child.name == STAGING_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    marker.unlink()
    path.rmdir()


def publish(staging: Path, out: Path, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Move the finished staging folder to `out` (see the module docstring for what `force` may
    replace). If `out` appeared meanwhile and may not be replaced, the checkpoint is kept under a
    visible name next to it and the CheckpointError says where."""
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    try:
        rename_noreplace(staging, out)
        return out
    except FileExistsError:
        if not force:
            _keep_aside(staging, out, f"{out} was created by someone else while this checkpoint was being "
                                      "written, and it was left alone")
    try:
        check_replaceable(out, inputs)
    except ConfigError as e:
        _keep_aside(staging, out, str(e))
    try:
        replace_atomically(staging, out)
    except FileNotFoundError:  # it vanished between the check and the swap
        rename_noreplace(staging, out)
    return out


def _keep_aside(staging: Path, out: Path, why: str) -> None:
    kept = out.parent / f"{out.name}.lowbit-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        rename_noreplace(staging, kept)
    except OSError:
        kept = staging
    raise CheckpointError(f"{why}; the new checkpoint was saved as {kept} instead: move it where you want it")


def write_atomically(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename: readers see the old file or the new one.
    The new file gets the mode the umask gives (not mkstemp's 0600)."""
    tmp = path.parent / f".{path.name}.lowbit-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
