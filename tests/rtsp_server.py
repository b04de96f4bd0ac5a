#!/usr/bin/python3
"""A real RTSP server on loopback for the camera tests and the camera benchmark.

Runs under Debian's /usr/bin/python3, because GStreamer's RTSP server comes
through GObject introspection (``python3-gi``, ``gir1.2-gst-rtsp-server-1.0``),
which the project's venv cannot import. Serves ``rtsp://HOST:PORT/PATH`` from

- a live H.264 test pattern (default), optionally one solid colour, or
- a video file (``--file``): H.264 files are sent as they are (no re-encoding,
  so a benchmark measures the client); anything else needs ``--reencode``.
  Each client gets the file once from its start, in real time, then the stream
  ends: make the file as long as the run that reads it.

Prints ``READY rtsp://...`` on stdout once it listens, then serves until killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import gi  # type: ignore[import-not-found]  # Debian's python3-gi, not in the venv

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # type: ignore[import-not-found]  # noqa: E402


def pattern_launch(width: int, height: int, fps: int, color: int | None, bitrate: int) -> str:
    pattern = "pattern=smpte"
    if color is not None:
        pattern = f"pattern=solid-color foreground-color={color:#010x}"
    return (
        f"( videotestsrc is-live=true {pattern} "
        f"! video/x-raw,width={width},height={height},framerate={fps}/1 "
        "! videoconvert ! video/x-raw,format=I420 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast bitrate={bitrate} key-int-max={fps} "
        "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
    )


def file_launch(reencode: bool, bitrate: int) -> str:
    # The location is set on "media-configure": no path ever goes through launch syntax.
    if reencode:
        return (
            "( filesrc name=file ! decodebin ! videoconvert "
            "! video/x-raw,format=I420 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast bitrate={bitrate} "
            "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
        )
    return (
        "( filesrc name=file ! parsebin ! h264parse "
        "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
    )


def set_location(_factory: object, media: GstRtspServer.RTSPMedia, path: str) -> None:
    media.get_element().get_by_name("file").set_property("location", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/test")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--bitrate", type=int, default=2000, help="x264 kbit/s")
    parser.add_argument("--color", type=lambda s: int(s, 0), default=None,
                        help="solid ARGB colour such as 0xffc86432 instead of SMPTE bars")
    parser.add_argument("--file", help="serve this video file instead of a test pattern")
    parser.add_argument("--reencode", action="store_true",
                        help="decode and re-encode --file (for files that are not H.264)")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    if args.file:
        if not os.path.isfile(args.file):
            print(f"ERROR no such file: {args.file}", flush=True)
            return 1
        factory.set_launch(file_launch(args.reencode, args.bitrate))
        factory.set_shared(False)  # every client starts the file from its beginning
        factory.connect("media-configure", set_location, args.file)
    else:
        factory.set_launch(
            pattern_launch(args.width, args.height, args.fps, args.color, args.bitrate)
        )
        factory.set_shared(True)  # a live camera: clients join the running stream
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"ERROR cannot listen on {args.host}:{args.port}", flush=True)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY rtsp://{args.host}:{server.get_bound_port()}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
