"""Every key of a data build, with its default. Build configs under `configs/` start from here."""

from __future__ import annotations

import ml_collections


def build_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "build"  # launch.py runs the data builder for this config
  c.input_dir = ""  # every file under it is read (format by extension, schema per record)
  c.stdlib = False  # also read the embedded default: this Python's standard-library API docs
  c.field_map = ml_collections.ConfigDict({})  # renames raw fields before schema detection, e.g. {"question": "prompt"}
  c.read_max_record_bytes = 16 * 2**20  # a longer line, row or document is rejected unparsed (bounds memory); 0: no limit

  c.clean = ml_collections.ConfigDict()
  c.clean.fix_unicode = True  # ftfy: mojibake, broken Unicode, control characters
  c.clean.unicode_form = "NFC"
  c.clean.strip_html = True  # only texts that hold tags
  c.clean.pii = ("email", "ip_address", "phone")  # replaced by <EMAIL>, <IP_ADDRESS>, <PHONE>; () keeps them
  c.clean.phone_region = "US"  # numbers without +country are read as this region's (phonenumbers); "" only +country
  c.clean.phone_leniency = "valid"  # phonenumbers leniency; "possible" also takes year ranges like (1313-1375)
  # Chat control strings in the data (<|im_start|>, [INST], <start_of_turn>, ..., and the ones of
  # filter.length.tokenizer) would become real control tokens and forge turns. "escape": a backslash after
  # the first character (<\|im_start|>), counted in edits as control_strings_escaped; "drop": the record.
  c.clean.control_strings = "escape"

  c.filter = ml_collections.ConfigDict()
  c.filter.length = ml_collections.ConfigDict()
  c.filter.length.min_characters = 2
  c.filter.length.max_characters = 100_000  # 0: no limit
  c.filter.length.min_words = 1
  c.filter.length.max_words = 20_000
  c.filter.length.min_tokens = 0  # token bounds need filter.length.tokenizer
  c.filter.length.max_tokens = 0
  c.filter.length.tokenizer = ""  # a SentencePiece .model or a Hugging Face folder, to count tokens

  # Gopher quality rules (thresholds as in Rae et al. 2021 / datatrove).
  c.filter.gopher = ml_collections.ConfigDict()
  c.filter.gopher.enabled = True
  c.filter.gopher.min_words_to_apply = 50  # shorter texts skip these rules: their ratios are noise
  c.filter.gopher.min_mean_word_length = 3.0
  c.filter.gopher.max_mean_word_length = 10.0
  c.filter.gopher.max_symbol_word_ratio = 0.1  # '#' and ellipses per word
  c.filter.gopher.min_alpha_word_ratio = 0.8  # words with at least one letter
  c.filter.gopher.min_stop_words = 2
  c.filter.gopher.max_duplicate_line_fraction = 0.3
  c.filter.gopher.max_duplicate_line_char_fraction = 0.2
  c.filter.gopher.max_duplicate_paragraph_fraction = 0.3
  c.filter.gopher.max_duplicate_paragraph_char_fraction = 0.2
  c.filter.gopher.max_top_ngram_char_fraction = ml_collections.ConfigDict({"2": 0.2, "3": 0.18, "4": 0.16})
  c.filter.gopher.max_duplicated_ngram_char_fraction = ml_collections.ConfigDict(
      {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
  )

  c.filter.language = ml_collections.ConfigDict()
  c.filter.language.enabled = True
  c.filter.language.languages = ("en",)  # ISO 639-1 codes to keep
  c.filter.language.min_confidence = 0.5
  c.filter.language.min_chars = 40  # shorter texts are not judged

  c.filter.sft = ml_collections.ConfigDict()
  c.filter.sft.min_response_alnum_chars = 1  # fewer letters/digits than this: a trivial response
  c.filter.sft.refusal_patterns = ("default",)  # regexes; ("default",) is quality.REFUSALS, () turns it off

  c.decontaminate = ml_collections.ConfigDict()
  c.decontaminate.eval_files = ()  # evaluation sets, in any format the readers take
  c.decontaminate.ngram = 13
  c.decontaminate.min_words = 8  # shorter eval items are matched whole if at least this long
  # Every eval item is also matched by its whole normalised text, whatever its length: a record (or
  # turn) equal to it, or holding it when it has at least this many words, is dropped ("eval item (exact)").
  c.decontaminate.exact_min_words = 3

  c.dedup = ml_collections.ConfigDict()
  c.dedup.exact = True  # same text after lowercasing and collapsing whitespace
  c.dedup.near = True
  c.dedup.num_perm = 112  # MinHash permutations = bands x rows (FineWeb / datatrove: 14 x 8, 5-grams)
  c.dedup.bands = 14
  c.dedup.rows = 8
  c.dedup.shingle_size = 5  # words per shingle
  c.dedup.threshold = 0.7  # estimated Jaccard a candidate pair must reach
  c.dedup.seed = 1

  c.annotate = ml_collections.ConfigDict()
  c.annotate.model_workdir = ""  # a workdir trained by this project: fills missing responses, self-instruct, scores
  c.annotate.batch_size = 32
  c.annotate.max_new_tokens = 128
  c.annotate.self_instruct = ml_collections.ConfigDict()
  c.annotate.self_instruct.num_instructions = 0  # new instructions to write from seed tasks
  c.annotate.self_instruct.examples_per_prompt = 3
  c.annotate.self_instruct.seed = 0
  c.annotate.score = ml_collections.ConfigDict()
  c.annotate.score.enabled = False  # rate every example 1-5 with the model, drop below min_score
  c.annotate.score.min_score = 3

  c.format = ml_collections.ConfigDict()
  c.format.system_prompt = ""  # added as the system turn of chats that have none

  c.output = ml_collections.ConfigDict()
  c.output.validation_fraction = 0.05  # by a hash of the record's group (or id)
  c.output.salt = ""  # changes which records go to validation, deterministically
  c.output.num_shards = 1  # ArrayRecord shards per split
  c.output.examples_per_reason = 3  # in the report

  c.runner = "local"  # "local": worker processes on this machine; "beam": Apache Beam
  c.num_workers = 0  # local worker processes; 0: one per CPU
  c.beam_options = ()  # e.g. ("--runner=DataflowRunner", "--project=...") ; default DirectRunner
  return c
