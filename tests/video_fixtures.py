"""Writing test videos with PyAV (shared by the video tests). Holds no tests itself."""

import av

# (container, codec, pixel format): ffv1 is lossless, the others are compared with PyAV's own decoding
CODECS = {"mkv": ("matroska", "ffv1", "bgr0"), "mp4": ("mp4", "libx264", "yuv420p"),
          "webm": ("webm", "libvpx-vp9", "yuv420p")}


def write_video(path, frames, ext):
  """uint8 (F, H, W, 3) RGB frames -> a video file at `path` in CODECS[ext] (yuv420p codecs need even sides)."""
  container, codec, pix_fmt = CODECS[ext]
  with av.open(str(path), "w", format=container) as out:
    stream = out.add_stream(codec, rate=4)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    for frame in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    out.mux(stream.encode())
  return path
