"""Video: files, streams and cameras through PyAV (the `video` extra), sampled into frames for the
still-image pipeline and retriever.

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_artifacts("out/toy")
    for event in pipe.watch("clip.mp4", every=1.0, questions=["what colour is it?"]):
        print(event.timestamp, event.text)

Importing this package imports no video library: PyAV is imported when a source is opened
(runtime.video.library), and a missing extra is one line naming it.
"""

from runtime.video.alerts import AlertRule, AlertTracker
from runtime.video.file_source import FileSource
from runtime.video.live_source import LiveSource
from runtime.video.sampling import Sampler, SamplingOptions
from runtime.video.sources import SourceOptions, open_source
from runtime.video.watch import WatchEvent, watch_pipeline, watch_retriever

__all__ = ["AlertRule", "AlertTracker", "FileSource", "LiveSource", "Sampler", "SamplingOptions", "SourceOptions",
           "WatchEvent", "open_source", "watch_pipeline", "watch_retriever"]
