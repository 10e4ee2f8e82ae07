"""URIs to pyarrow filesystems, and small safe read/write helpers over them.

Every path in imgcls goes through `resolve`, so a new scheme (s3://) only has to be added here.
Relative local paths resolve against `IMGCLS_BASE_DIR` when it is set (so a job submitted with
`ray job submit --working-dir .` still writes next to the user's checkout), else the current directory.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from imgcls.errors import UserError

BASE_DIR_VARIABLE = "IMGCLS_BASE_DIR"


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem to use and the path inside it."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        joined = str(PurePosixPath(self.path, *parts))
        return Location(self.filesystem, joined, joined if self.is_local else f"{self.scheme}://{joined}")

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def scheme(self) -> str:
        return "file" if self.is_local else self.filesystem.type_name


def resolve(uri: str) -> Location:
    """Map a user URI to a filesystem and path. Local paths become absolute."""
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme == "file":
            uri = uri[len("file://") :]
        else:
            raise UserError(
                f"Unsupported storage scheme '{scheme}://' in {uri!r}: use a local path for now."
            )
    path = Path(os.path.expanduser(uri))
    if not path.is_absolute():
        path = Path(os.environ.get(BASE_DIR_VARIABLE) or os.getcwd()) / path
    absolute = os.path.normpath(str(path))
    return Location(pafs.LocalFileSystem(), absolute, absolute)


def exists(location: Location) -> bool:
    return location.filesystem.get_file_info(location.path).type != pafs.FileType.NotFound


def is_directory(location: Location) -> bool:
    return location.filesystem.get_file_info(location.path).type == pafs.FileType.Directory


def read_bytes(location: Location) -> bytes:
    with location.filesystem.open_input_stream(location.path) as stream:
        return stream.read()


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Write so that readers see the old file or the whole new one, never a partial one."""
    parent = str(PurePosixPath(location.path).parent)
    location.filesystem.create_dir(parent, recursive=True)
    if location.is_local:
        temporary = f"{parent}/.{PurePosixPath(location.path).name}.{uuid.uuid4().hex}.tmp"
        with location.filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        location.filesystem.move(temporary, location.path)
    else:
        # Object stores make a single PUT visible all at once.
        with location.filesystem.open_output_stream(location.path) as stream:
            stream.write(data)


def write_text_atomic(location: Location, text: str) -> None:
    write_bytes_atomic(location, text.encode("utf-8"))
