"""DINOScore: the DreamBooth paper's subject-fidelity metric (and PRES, DIV, CLIP-I, CLIP-T) inside the graph."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainers import metrics
from ..trainers.errors import PersonalizeError

AUTO = "auto (first DINO model in models/dino)"
NO_CLIP = "(none)"
METRICS_EVENT = "personalize.metrics"


def _entries(kind: str, accept) -> list[str]:
    import folder_paths

    found = []
    for folder in folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []:
        root = Path(folder)
        if root.is_dir():
            found += [entry.name for entry in sorted(root.iterdir()) if accept(entry)]
    return found


def dino_choices() -> list[str]:
    return [AUTO] + _entries("dino", lambda p: p.suffix == ".pth" or (p / "config.json").is_file())


def clip_choices() -> list[str]:
    return [NO_CLIP] + _entries("clip_vision", lambda p: (p / "config.json").is_file())


def resolve_model(kind: str, name: str) -> Path:
    import folder_paths

    for folder in folder_paths.get_folder_paths(kind):
        candidate = Path(folder) / name
        if candidate.exists() and candidate.resolve().is_relative_to(Path(folder).resolve()):
            return candidate
    raise PersonalizeError(f"{name!r} is not in any {kind} folder ({', '.join(folder_paths.get_folder_paths(kind))})")


class DINOScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DINOScore",
            display_name="DINO Score (Personalize)",
            category="personalize/evaluate",
            description="Subject fidelity as in the DreamBooth paper: mean cosine similarity of DINO ViT-S/16 "
                        "embeddings over all (generated, reference) pairs. Optionally PRES (class-prompt samples "
                        "vs the subject), DIV (diversity of the generated images) and CLIP-I/CLIP-T.",
            inputs=[
                io.Image.Input("generated", tooltip="images sampled with the personalized model"),
                io.Image.Input("reference", tooltip="the real subject photos"),
                io.Combo.Input("dino_model", options=dino_choices(), tooltip="facebook/dino-vits16 (folder) or "
                               "dino_deitsmall16_pretrain.pth in models/dino"),
                io.Int.Input("batch_size", default=8, min=1, max=256, step=1, advanced=True),
                io.Image.Input("class_generated", optional=True, tooltip="samples of the class prompt ('a dog'): "
                               "gives PRES, lower is better"),
                io.Combo.Input("clip_model", options=clip_choices(), optional=True, tooltip="a Hugging Face CLIP "
                               "folder in models/clip_vision: gives CLIP-I, and CLIP-T with a prompt"),
                io.String.Input("prompt", optional=True, default="", tooltip="the prompt of the generated images "
                                "(CLIP-T)"),
            ],
            outputs=[io.Float.Output(display_name="dino"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, generated, reference, dino_model, batch_size, class_generated=None, clip_model=NO_CLIP,
                prompt="") -> io.NodeOutput:
        import comfy.model_management
        import folder_paths

        device = comfy.model_management.get_torch_device()
        path = (metrics.find_dino_model(folder_paths.get_folder_paths("dino")) if dino_model == AUTO
                else resolve_model("dino", dino_model))
        dino = metrics.load_dino(path, device)
        results = [metrics.dino_score(dino, generated, reference, batch_size)]
        if class_generated is not None:
            results.append(metrics.pres_score(dino, class_generated, reference, batch_size))
        if generated.shape[0] > 1:
            results.append(metrics.div_score(dino, generated, batch_size))
        if clip_model and clip_model != NO_CLIP:
            clip = metrics.load_clip(resolve_model("clip_vision", clip_model), device)
            results.append(metrics.clip_i_score(clip, generated, reference, batch_size))
            if prompt.strip():
                results.append(metrics.clip_t_score(clip, generated, prompt, batch_size))
        report = "\n\n".join(r.report() for r in results)
        values = {r.metric.lower().replace("-", "_"): round(r.score, 6) for r in results}
        values["pairs"] = results[0].pairs
        _send_metrics(cls.hidden.unique_id, values)
        return io.NodeOutput(results[0].score, report, ui={"text": [report], "metrics": [values]})


def _send_metrics(node_id, values: dict) -> None:
    from server import PromptServer

    server = PromptServer.instance
    if server.client_id is not None:
        server.send_sync(METRICS_EVENT, {"node": node_id, "metrics": values}, server.client_id)
