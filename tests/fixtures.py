"""Small prepared run directories built directly through the artifact layer.

Later stages are tested on these so that their tests do not depend on ``mmrec prepare``'s sources. Users
follow latent categories (a Markov chain over categories, skewed popularity within one), so a sequential
model has something to learn; text embeddings are noisy category centroids.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pyarrow as pa

from mmrec.artifacts import Manifest, stage_output, write_table
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.schemas import INTERACTIONS, ITEMS, USERS, embeddings_schema, embeddings_table
from mmrec.models.llm.backbone import tiny_backbone


def make_prepared_run(
    run_dir: str | Path,
    num_users: int = 60,
    num_items: int = 40,
    num_categories: int = 4,
    seq_len: tuple[int, int] = (5, 12),
    text_dim: int = 16,
    seed: int = 0,
    missing_text: int = 1,
) -> Path:
    """Write ``<run_dir>/prepare`` with items, users, interactions (leave-one-out) and text embeddings."""
    rng = np.random.default_rng(seed)
    category = np.arange(num_items) % num_categories
    transition = np.full((num_categories, num_categories), 0.1 / max(1, num_categories - 1))
    np.fill_diagonal(transition, 0.9)
    popularity = rng.zipf(1.5, num_items).astype(float)
    rows = []
    for user in range(num_users):
        length = int(rng.integers(seq_len[0], seq_len[1] + 1))
        cat = int(rng.integers(num_categories))
        for pos in range(length):
            members = np.flatnonzero(category == cat)
            weights = popularity[members] / popularity[members].sum()
            item = int(rng.choice(members, p=weights))
            split = "test" if pos == length - 1 else "valid" if pos == length - 2 else "train"
            rows.append((user, item, pos, 1_000_000 + pos, split))
            cat = int(rng.choice(num_categories, p=transition[cat]))
    users, items, positions, stamps, splits = map(list, zip(*rows))
    interactions = pa.table(
        {"user_idx": users, "item_idx": items, "position": positions, "timestamp": stamps, "split": splits}
    )
    centroids = rng.normal(size=(num_categories, text_dim))
    text = centroids[category] + 0.3 * rng.normal(size=(num_items, text_dim))
    present = np.ones(num_items, dtype=bool)
    present[:missing_text] = False
    titles = [None if not p else f"item {i} of category {c}" for i, (c, p) in enumerate(zip(category, present))]
    item_table = pa.table(
        {"item_idx": np.arange(num_items, dtype=np.int32), "item_id": [f"I{i:04d}" for i in range(num_items)],
         "text": titles, "image": [None] * num_items},
        schema=ITEMS,
    )
    user_table = pa.table({"user_idx": np.arange(num_users, dtype=np.int32), "user_id": [f"U{u}" for u in range(num_users)]})
    manifest = Manifest(stage="prepare", config={"source": "tests.fixtures", "seed": seed}, seed=seed)
    with stage_output(run_dir, "prepare", manifest) as out:
        write_table(item_table, out / "items.parquet", ITEMS)
        write_table(user_table, out / "users.parquet", USERS)
        write_table(interactions, out / "interactions.parquet", INTERACTIONS)
        write_table(embeddings_table(text, present), out / "emb_text.parquet", embeddings_schema(text_dim))
        for name, rows_ in [("items", num_items), ("users", num_users), ("interactions", len(rows)), ("emb_text", num_items)]:
            manifest.add_output(name, out / f"{name}.parquet", rows=rows_)
        manifest.lineage = {"items": file_sha256(out / "items.parquet"), "interactions": file_sha256(out / "interactions.parquet")}
    return Path(run_dir)


def write_modality(run_dir: str | Path, stage: str, modality: str, matrix: np.ndarray, present: np.ndarray | None = None) -> Path:
    """Publish ``emb_<modality>.parquet`` as stage ``stage`` of ``run_dir``, with the prepare lineage."""
    prepared = Manifest.read(Path(run_dir) / "prepare")
    present = np.ones(len(matrix), dtype=bool) if present is None else present
    manifest = Manifest(stage=stage, config={"source": "tests.fixtures"}, lineage=dict(prepared.lineage))
    with stage_output(run_dir, stage, manifest) as out:
        path = out / f"emb_{modality}.parquet"
        write_table(embeddings_table(matrix, present), path, embeddings_schema(matrix.shape[1]))
        manifest.add_output(f"emb_{modality}", path, rows=len(matrix))
    return Path(run_dir) / stage


def _heads_first(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of a q/k projection (transformers undoes it when reading a GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, seed_offset: float = 0.0) -> None:
    """The ``tiny`` backbone as a float32 llama GGUF (``seed_offset`` shifts one weight: another file)."""
    model, tokenizer = tiny_backbone()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    special = set(tokenizer.all_special_tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}
    state["model.norm.weight"] = state["model.norm.weight"] + seed_offset
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        ours = f"model.layers.{layer}."
        for hf_name, gguf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", state[f"{ours}{hf_name}.weight"])
        writer.add_tensor(f"blk.{layer}.attn_q.weight", _heads_first(state[f"{ours}self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight", _heads_first(state[f"{ours}self_attn.k_proj.weight"], config.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
