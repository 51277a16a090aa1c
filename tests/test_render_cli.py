import hashlib
import json

from optical_memory.apps.cli import main


def test_render_writes_pngs_and_manifest(tmp_path):
    transcript = tmp_path / "t.jsonl"
    lines = [{"role": "user", "content": "Привет " * 400}, {"role": "assistant", "content": "ok"}]
    transcript.write_text("\n".join(json.dumps(m) for m in lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["render", str(transcript), "--out", str(out), "--mode", "tiny"]) == 0
    manifest = json.loads((out / "pages.json").read_text())
    pages = manifest["pages"]
    assert len(pages) >= 2
    assert pages[0]["first_turn"] == 0 and pages[-1]["last_turn"] == 1
    for entry in pages:
        png = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == entry["png_sha256"]
        assert (entry["mode"], entry["width"], entry["height"], entry["vision_tokens"]) == (
            "tiny",
            512,
            512,
            73,
        )
        assert entry["missing_glyphs"] == 0 and entry["text_tokens"] > 0
    assert {f["role"] for f in manifest["fonts"]} >= {"sans", "mono", "label", "fallback"}


def test_bad_line_is_named_and_nothing_is_written(tmp_path, capsys):
    transcript = tmp_path / "t.jsonl"
    transcript.write_text('{"role": "user", "content": "a"}\n{"role": "user"}\n')
    out = tmp_path / "out"
    assert main(["render", str(transcript), "--out", str(out)]) == 1
    assert "line 2: missing 'content'" in capsys.readouterr().err
    assert not out.exists()
