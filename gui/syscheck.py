"""Before the window opens: are the system libraries Qt's X11 (xcb) platform needs here?

Qt reports any failure to load its xcb plugin as "xcb-cursor0 or libxcb-cursor0 is
needed", even when that library is installed and others are missing (on a fresh Debian,
libxcb-icccm4 and libxcb-keysyms1).  This asks the dynamic linker (`ldd`) what the
plugin really lacks and names the Debian/Ubuntu packages to install, in one line.

    python -m paralab.gui.syscheck     # exit 0: fine; 1: prints what to install
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# soname -> Debian/Ubuntu package
PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xinput.so.0": "libxcb-xinput0",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libOpenGL.so.0": "libopengl0",
    "libGLX.so.0": "libglx0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
}
# Everything the app needs on Debian/Ubuntu, as README says: one line to paste.
ALL_PACKAGES = ("libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1", "libxcb-image0", "libxcb-render-util0",
                "libxcb-shape0", "libxcb-xkb1", "libxcb-randr0", "libxkbcommon-x11-0", "libegl1", "libgl1",
                "libfontconfig1", "libdbus-1-3")
# Loaded by Qt at run time (dlopen), so ldd cannot see that it is missing.
DLOPENED = {"xcb-cursor": "libxcb-cursor0"}


def qt_libraries() -> list[Path]:
    """The xcb platform plugin and the library it is built on, inside PySide6."""
    import PySide6

    qt = Path(PySide6.__file__).parent / "Qt"
    found = [qt / "plugins" / "platforms" / "libqxcb.so", *sorted((qt / "lib").glob("libQt6XcbQpa.so*"))[:1]]
    return [p for p in found if p.exists()]


def missing_libraries(paths: list[Path] | None = None) -> list[str]:
    """Sonames the dynamic linker cannot find for Qt's xcb platform (plus the dlopened ones)."""
    missing: list[str] = []
    ldd = shutil.which("ldd")
    for path in qt_libraries() if paths is None else paths:
        if ldd is None:
            break
        try:
            out = subprocess.run([ldd, str(path)], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for soname in re.findall(r"^\s*(\S+) => not found", out, flags=re.MULTILINE):
            if soname not in missing:
                missing.append(soname)
    for name, package in DLOPENED.items():
        if ctypes.util.find_library(name) is None and package not in (PACKAGES.get(m) for m in missing):
            missing.append(f"lib{name}.so")
    return missing


def install_line(missing: list[str]) -> str:
    packages: list[str] = []
    for soname in missing:
        package = PACKAGES.get(soname) or DLOPENED.get(soname[3:].split(".so")[0]) or soname
        if package not in packages:
            packages.append(package)
    return "sudo apt-get install -y " + " ".join(packages)


def needs_xcb() -> bool:
    """Qt will use X11: Linux, and no other platform asked for (offscreen, wayland, …)."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    return sys.platform.startswith("linux") and platform in ("", "xcb")


def report() -> str | None:
    """None when the app can open here; otherwise what to install, for a person."""
    if not needs_xcb():
        return None
    missing = missing_libraries()
    if not missing:
        return None
    return ("paralab cannot open its window: Qt's X11 platform needs system libraries this machine lacks: "
            f"{', '.join(missing)}.\nOn Debian or Ubuntu install them with:\n\n    {install_line(missing)}\n\n"
            "(Qt itself may only say that xcb-cursor0 is needed, whatever is missing.)")


def main() -> int:
    text = report()
    if text:
        print(text, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
