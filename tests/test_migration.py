"""Coming from another trainer with its dataset layout, metadata, dataset config and flags (the third new-user
audit). Each test is one finding: before, a silent wrong result (a mistyped caption file trained other captions, a
list caption trained as its repr, rows and lines without a path dropped uncounted, CogVideo's images.txt and its
validation prompt file ignored) or an error that did not say what to do."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ptrain.config import ConfigError, DataArgs, parse_config
from ptrain.data.sources import load_records


def _folder(root: Path, files: dict[str, str], media: int = 3) -> Path:
    """A dataset folder: media files v0.mp4 ... (empty: load_records reads no pixels) and the given text files."""
    (root / "videos").mkdir(parents=True)
    for i in range(media):
        (root / "videos" / f"v{i}.mp4").write_bytes(b"")
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


VIDEOS = "videos/v0.mp4\nvideos/v1.mp4\nvideos/v2.mp4\n"
CAPTIONS = "a cat\na dog\na bird\n"


def test_line_files_named_or_found_as_finetrainers_names_them(tmp_path):
    # finetrainers' / CogVideo finetune's prompt.txt (singular) + video.txt: found (they were not, and every video
    # was then reported as lacking a .txt beside it)
    root = _folder(tmp_path / "a", {"prompt.txt": CAPTIONS, "video.txt": VIDEOS})
    assert [r.caption for r in load_records(DataArgs(data_root=root))] == ["a cat", "a dog", "a bird"]
    # a mistyped caption file name: an error naming it and the folder's .txt files (prompts.txt's captions had
    # trained without a word)
    root = _folder(tmp_path / "b", {"prompts.txt": CAPTIONS, "videos.txt": VIDEOS, "long.txt": "x\ny\nz\n"})
    with pytest.raises(ConfigError, match=r"--caption_column lnog.txt: no such file in --data_root .*long.txt"):
        load_records(DataArgs(data_root=root, caption_column="lnog.txt", video_column="videos.txt"))
    named = load_records(DataArgs(data_root=root, caption_column="long.txt"))  # the video file: the default one
    assert [r.caption for r in named] == ["x", "y", "z"]
    # a table's column name for a folder of line files: nothing would read it
    with pytest.raises(ConfigError, match=r"--caption_column text: .* is read as line files \(prompts.txt \+ vid"):
        load_records(DataArgs(data_root=root, caption_column="text"))
    # two caption files of finetrainers' names: which one is meant is not guessed
    root = _folder(tmp_path / "c", {"prompts.txt": CAPTIONS, "captions.txt": CAPTIONS, "videos.txt": VIDEOS})
    with pytest.raises(ConfigError, match=r"several caption / video line files \(prompts.txt, captions.txt, vid"):
        load_records(DataArgs(data_root=root))


def test_line_files_count_blank_lines_and_read_cogvideo_i2v_images(tmp_path):
    # a blank line in videos.txt: a counted skip naming the line (its caption had been dropped unseen)
    root = _folder(tmp_path / "a", {"prompts.txt": CAPTIONS, "videos.txt": "videos/v0.mp4\n\nvideos/v2.mp4\n"})
    records = load_records(DataArgs(data_root=root))
    assert [r.error for r in records] == [None, "empty line: no video path", None]
    assert records[1].video == root / "videos.txt line 2" and records[1].caption == "a dog"
    # CogVideo I2V's images.txt: each line the first frame of its video (it had been ignored)
    root = _folder(tmp_path / "b", {"prompts.txt": CAPTIONS, "videos.txt": VIDEOS,
                                    "images.txt": "i0.png\ni1.png\nmissing.png\n"})  # fmt: skip
    for name in ("i0.png", "i1.png"):
        (root / name).write_bytes(b"")
    records = load_records(DataArgs(data_root=root, image_column="images.txt"))
    assert [r.first_frame for r in records] == [root / "i0.png", root / "i1.png", root / "missing.png"]
    assert records[0].first_frame_error is None and records[2].error is None  # a normal run uses the video alone
    assert "first-frame image" in records[2].first_frame_error and "not found" in records[2].first_frame_error
    (root / "images.txt").write_text("i0.png\ni1.png\n")
    with pytest.raises(ConfigError, match="prompts.txt has 3 lines but videos.txt has 3 lines but images.txt has 2"):
        load_records(DataArgs(data_root=root, image_column="images.txt"))


def test_line_separators_inside_a_caption_keep_the_lines_paired(tmp_path):
    """U+2028 / U+0085 inside a caption: lines end at newlines, as editors and `wc -l` count them (str.splitlines
    split there too, and the caption file then had more lines than the video file)."""
    root = _folder(tmp_path, {"prompts.txt": "a cat\u2028on a mat\r\na dog\u0085\na bird\n", "videos.txt": VIDEOS})
    captions = [r.caption for r in load_records(DataArgs(data_root=root))]
    assert captions == ["a cat\u2028on a mat", "a dog", "a bird"]  # (U+0085 at the end is stripped as whitespace)


def test_table_rows_without_a_path_or_with_a_list_caption_are_counted_skips(tmp_path):
    import json

    rows = [{"file_path": "videos/v0.mp4", "text": ["a cat", "a kitten"]},
            {"file_path": "videos/v1.mp4", "text": None},
            {"file_path": "", "text": "row with an empty path"},
            {"text": "row without the path key"},
            {"file_path": "videos/v2.mp4", "text": "ok"}]  # fmt: skip
    root = _folder(tmp_path, {"meta.json": json.dumps(rows)})
    records = load_records(DataArgs(dataset_file=root / "meta.json"))
    assert len(records) == 5
    assert records[0].error.startswith("caption is a list of 2, not text")  # it trained "['a cat', 'a kitten']"
    assert records[1].error is None and records[1].caption == ""
    assert [str(r.video) for r in records[2:4]] == [f"{root / 'meta.json'} row 3", f"{root / 'meta.json'} row 4"]
    assert records[2].error == records[3].error == "no media path (file_path empty or missing)"
    assert records[4].error is None

    from ptrain.data import filter_usable

    usable = filter_usable(records, 1)
    assert len(usable.skipped) == 5  # the 3 empty mp4s fail to decode; every row is counted and named
    assert usable.skipped[f"{root / 'meta.json'} row 3"] == "no media path (file_path empty or missing)"


def test_videofolder_file_name_column_and_caption_extension(tmp_path, caplog):
    root = _folder(tmp_path / "a", {"metadata.csv": "file_name,caption\nvideos/v0.mp4,a cat\nvideos/v1.mp4,a dog\n"})
    assert [r.video.name for r in load_records(DataArgs(data_root=root))] == ["v0.mp4", "v1.mp4"]
    # musubi-tuner's caption_extension; a clip and its thumbnail of one name share the caption: both train, said
    root = _folder(tmp_path / "b", {"videos/v0.caption": "a cat", "videos/v1.caption": "a dog",
                                    "videos/v2.caption": "a bird"})  # fmt: skip
    (root / "videos" / "v0.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ptrain"):
        records = load_records(DataArgs(data_root=root, caption_extension=".caption"))
    assert [(r.video.name, r.caption, r.error) for r in records][:2] == [("v0.jpg", "a cat", None),
                                                                         ("v0.mp4", "a cat", None)]  # fmt: skip
    assert "1 caption files under" in caplog.text and "(e.g. v0.jpg, v0.mp4)" in caplog.text
    assert all(r.error == "no caption file v0.txt beside it" for r in load_records(DataArgs(data_root=root))[:1])
    with pytest.raises(ConfigError, match="--caption_column caption: .* is read as caption files"):
        load_records(DataArgs(data_root=root, caption_extension=".caption", caption_column="caption"))
    with pytest.raises(ConfigError, match=r"--caption_extension 'caption': give it with its dot"):
        DataArgs(data_root=root, caption_extension="caption").validate()


def test_other_trainers_dataset_configs_say_what_ptrain_reads(tmp_path):
    _folder(tmp_path, {})
    musubi = tmp_path / "musubi.toml"
    musubi.write_text('[general]\nresolution = [64, 64]\nbatch_size = 1\n\n[[datasets]]\nvideo_directory = "videos"\n'
                      "num_repeats = 2\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"top-level keys \['general'\] are not read .*general -> flags on the co"):
        load_records(DataArgs(dataset_config=musubi))
    musubi.write_text('[[datasets]]\nvideo_directory = "videos"\nnum_repeats = 2\ntarget_frames = [1, 9]\n')
    with pytest.raises(ConfigError, match=r"unknown keys .*; ptrain's keys are data_root, .*; from another trainer: "
                                          r"num_repeats -> repeats, target_frames -> --num_frames, video_directory "
                                          r"-> data_root"):  # fmt: skip
        load_records(DataArgs(dataset_config=musubi))
    pipe = tmp_path / "diffusion_pipe.toml"
    pipe.write_text("resolutions = [64]\n\n[[directory]]\npath = 'videos'\nnum_repeats = 5\n")
    with pytest.raises(ConfigError, match=r"\[\[directory\]\] tables are diffusion-pipe's; write each as a "):
        load_records(DataArgs(dataset_config=pipe))
    ok = tmp_path / "ok.toml"  # the same data in ptrain's keys, caption_extension per entry
    for i in range(3):
        (tmp_path / "videos" / f"v{i}.caption").write_text(f"clip {i}")
    ok.write_text('[[datasets]]\ndata_root = "videos"\ncaption_extension = ".caption"\nrepeats = 2\n')
    assert [r.caption for r in load_records(DataArgs(dataset_config=ok))] == ["clip 0"] * 2 + ["clip 1"] * 2 + [
        "clip 2"] * 2  # fmt: skip


def test_cogvideo_finetune_and_musubi_flags(tmp_path):
    cfg = parse_config(["--model_path", "ckpt", "--data_root", str(tmp_path), "--train_resolution", "49x480x720",
                        "--model_type", "i2v", "--training_type", "sft", "--model_name", "cogvideox1.5-5b-i2v",
                        "--gradient_checkpointing", "True", "--export_comfyui=false", "--vae_dtype", "bf16",
                        "--text_encoder_dtype", "fp16", "--network_dim", "16", "--network_alpha", "8",
                        "--discrete_flow_shift", "3", "--optimizer_type", "AdamW8bit", "--max_train_epochs", "2",
                        "--max_data_loader_n_workers", "1", "--weighting_scheme", "logit_normal"])  # fmt: skip
    m, d = cfg.model, cfg.data
    assert (m.pretrained_model_name_or_path, m.model_name, m.train_mode, m.training_type) == (
        "ckpt", "cogvideox", "i2v", "full-finetune")  # fmt: skip
    assert (d.num_frames, d.height, d.width, d.dataloader_num_workers) == (49, 480, 720, 1)
    assert cfg.activation_checkpoint.gradient_checkpointing and not cfg.checkpoint.export_comfyui
    assert (m.vae_dtype, m.text_encoder_dtype, m.rank, m.lora_alpha) == ("bfloat16", "float16", 16, 8.0)
    assert (cfg.objective.flow_shift, cfg.objective.flow_weighting_scheme) == (3.0, "logit_normal")
    assert (cfg.optim.optimizer, cfg.train.num_train_epochs) == ("adamw-8bit", 2)
    assert "--train_resolution 49x480x720 -> --num_frames 49 --height 480 --width 720" in cfg.compat_notes
    musubi = parse_config(["--data_root", "x", "--sample_every_n_steps", "50", "--log_with", "wandb",
                           "--lr_scheduler_num_cycles", "3", "--lr_scheduler_power", "2"])  # fmt: skip
    assert (musubi.validation.validation_steps, musubi.log.report_to) == (50, "wandb")
    assert (musubi.optim.lr_num_cycles, musubi.optim.lr_power) == (3, 2.0)
    assert not parse_config(["--data_root", "x", "--gradient_checkpointing", "no"]).activation_checkpoint.gradient_checkpointing  # fmt: skip
    for argv, message in (
        (["--train_resolution", "480x720"], r"--train_resolution '480x720': give frames x height x width"),
        (["--dit", "x.safetensors"], "--dit is not a ptrain flag: the transformer comes from"),
        (["--fp8_base"], "--layerwise_upcasting_modules transformer"),
        (["--dit_high_noise", "high.safetensors"], "train one per run with --expert high_noise or --expert low_noise"),
        (["--timestep_boundary", "875"], "boundary_ratio .* --min_timestep / --max_timestep"),
        (["--validation_dir", "val"], r"--validation_dataset_file prompts.txt"),
        (["--tracker_name", "proj"], "WANDB_PROJECT"),
        # musubi-tuner's command lines (a new-user trial: tyro offered --gc_every_n_steps for --save_every_n_steps)
        (["--save_every_n_steps", "100"], "--checkpointing_steps N saves resumable checkpoints"),
        (["--network_module", "networks.lora_wan"], r"LoRA is ptrain's default training type"),
        (["--network_weights", "old.safetensors"], "--resume_from_checkpoint latest"),
        (["--sample_prompts", "prompts.txt"], "--validation_dataset_file prompts.txt"),
        (["--save_last_n_steps", "1000"], "--checkpointing_limit N"),
        (["--xformers"], "--attention_backend"),
        (["--task", "t2v-14B"], "--pretrained_model_name_or_path"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(["--data_root", "x", *argv])
    # the CogVideoX diffusers script's --fps: said what it does here
    notes = parse_config(["--data_root", "x", "--fps", "8", "--max_num_frames", "49"]).compat_notes
    assert any(n.startswith("--fps resamples every clip") and "exported videos" in n for n in notes)


def test_validation_prompt_file_name_is_refused_and_a_prompt_file_is_read(tmp_path):
    """CogVideo's finetune scripts pass a file name in --validation_prompts: it was sampled as the prompt
    "prompts.txt". It is an error pointing to --validation_dataset_file, which reads a .txt one prompt a line."""
    from ptrain.validation import load_validation_items

    with pytest.raises(ConfigError, match=r"--validation_prompts 'prompts.txt' is a file name; .* use "
                                          r"--validation_dataset_file prompts.txt"):  # fmt: skip
        parse_config(["--data_root", "x", "--validation_prompts", "prompts.txt"]).validation.validate()
    parse_config(["--data_root", "x", "--validation_prompts", "a cat.:::prompts.txt is fine in a sentence"]) \
        .validation.validate()  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a cat on a mat\r\n\na dog\u2028running\n")
    cfg = parse_config(["--data_root", "x", "--validation_dataset_file", str(tmp_path / "prompts.txt")])
    items = load_validation_items(cfg.validation, cfg.data)
    assert [it.prompt for it in items] == ["a cat on a mat", "a dog\u2028running"]


def test_too_short_for_fps_says_how_long_the_frames_span(tiny_data):
    from ptrain.data import filter_usable
    from ptrain.data.video import FrameSampling

    records = load_records(DataArgs(data_root=tiny_data))[:1]
    usable = filter_usable(records, FrameSampling(40, fps=4))
    (reason,) = usable.skipped.values()
    assert "frames usable at --fps 4 (40 frames at 4 fps span 9.8 s) < --num_frames 40" in reason, reason
