"""LoadSubjectImages: a folder of subject photos from ComfyUI's input directory → IMAGE batch + captions."""

from __future__ import annotations

import hashlib

from comfy_api.latest import io, ui

from ..trainers.data import LoadSubjectConfig, load_subject_folder, resolve_inside
from .schema import config_from_inputs, option_inputs


def _input_dir():
    import folder_paths

    return folder_paths.get_input_directory()


def _subfolders() -> list[str]:
    import folder_paths

    return folder_paths.get_input_subfolders() or ["(put a folder of photos in ComfyUI's input directory)"]


class LoadSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadSubjectImages",
            display_name="Load Subject Images (Personalize)",
            category="personalize/data",
            description="Load 3-5 photos of one subject from a folder in ComfyUI's input directory: EXIF "
                        "orientation applied, any colour mode made RGB; images: square-cropped or padded; photos: at "
                        "their own aspect ratios (for the trainers' aspect buckets); with optional <image>.txt "
                        "captions.",
            inputs=[io.Combo.Input("folder", options=_subfolders(), tooltip="a folder inside ComfyUI's input "
                                   "directory holding the subject's photos")] + option_inputs(LoadSubjectConfig),
            outputs=[io.Image.Output(display_name="images"), io.Int.Output(display_name="count"),
                     io.String.Output(display_name="captions", tooltip="one line per image, empty where the image "
                                      "has no caption file"),
                     io.Image.Output(display_name="photos", is_output_list=True,
                                     tooltip="the photos at their own aspect ratios (about resolution² pixels each), "
                                     "as a list: for the trainers' aspect buckets")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **options):
        # Re-run when any file in the folder changes, as LoadImage does for its one file.
        digest = hashlib.sha256(repr(sorted(options.items())).encode())
        path = resolve_inside(_input_dir(), folder)
        for entry in sorted(path.iterdir()) if path.is_dir() else []:
            stat = entry.stat()
            digest.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, folder, **options) -> io.NodeOutput:
        config = config_from_inputs(LoadSubjectConfig, options)
        path = resolve_inside(_input_dir(), folder)
        subject = load_subject_folder(path, config.resolution, config.fit, confine_to=_input_dir())
        photos = load_subject_folder(path, config.resolution, "keep", confine_to=_input_dir()).images
        report = f"{len(subject.files)} images from {folder}"
        if subject.warnings:
            report += "\n" + "\n".join(subject.warnings)
        captions = "\n".join(" ".join(c.split()) for c in subject.captions)
        return io.NodeOutput(subject.images, len(subject.files), captions, photos, ui=ui.PreviewText(report))
