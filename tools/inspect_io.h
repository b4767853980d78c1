// What the inspection commands (map, detect, chat) share: output folders, the per-image outputs, JSON lines on
// stdout, and a first look at the model file the user named.
#pragma once
#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "model/anomalygpt.h"
#include "model/vision_model.h"

// Creates dir if missing (not its parents) and checks that files can be created in it (a probe file made and
// removed), so that an unwritable --out fails before any model loads; an existing non-folder is an error.
Status ensure_dir(const char *dir);
// "path/to/img_01.png" -> "img_01"
void stem_of(const char *path, char *out, size_t cap);
// <out_dir>/<stem>.map.safetensors (the raw [S,S] f32 map) and <out_dir>/<stem>.heatmap.png (the map over the
// image as the model saw it); their paths are returned in map_path and heatmap_path.
//
// Several processes may write the same folder at once (two runs on one --out): both files are written under
// names unique to this call (mkstemp: hidden ".<stem>....XXXXXX" beside the targets, skipped by folder walks),
// then renamed into place as a pair while this process holds an exclusive flock on the folder. Renames are
// atomic and the pairs of two runs cannot interleave, so when the runs end the folder holds, for every stem,
// the heatmap and the map of the same run (whichever published last). A reader looking during the two renames
// may see the new map beside the old heatmap for that instant. A run killed mid-write can leave a hidden
// temporary, never a partial file under a target name.
Status write_map_outputs(const VisionModel *m, const Image *img, const float *map, const char *out_dir,
                         const char *stem, char *heatmap_path, char *map_path, size_t cap);
// Prints obj as one line on stdout, flushed, and frees it. An error when the line could not be written
// (a full disk, a closed pipe): the result is lost, and the caller must not report success.
Status print_json_line(cJSON *obj);
// The end of a command that wrote results to stdout: flushes and closes it. When anything written to stdout
// was lost it says so on stderr and returns 1 (rc when rc is already non-zero); else rc.
int finish_stdout(const char *cmd, int rc);
// Refuses, with what to do, a --model / --weights path that is certainly not an agpt model file: a folder (an
// HF directory), or a PyTorch checkpoint (torch.save's zip or legacy pickle, e.g. an official .pth), which
// `agpt convert` turns into one. Other files are left to the model loader's own checks.
Status check_model_path(const char *path, const char *option);
// Whether a --class name can be used whole, else says why on stderr: class features are looked up and cached
// by name, which holds 127 bytes (model/vision_model.h); convert's --class takes at most 100, and so do these.
bool class_name_ok(const char *cmd, const char *name);

// Tokens a verdict-only answer generates: "Yes"/"No" is the answer's first token, with a margin for a leading
// space piece.
#define VERDICT_TOKENS 3
// The verdict of an answer, as the reference's accuracy reads it: "anomalous" when it starts with "Yes",
// "normal" with "No" (whole words, after leading spaces), NULL when neither (or answer is NULL).
const char *answer_verdict(const char *answer);
// The text of every generated token of ans, nothing stripped (malloc'd, NULL on failure): what a verdict-only
// answer, cut after VERDICT_TOKENS, reads its verdict from.
char *answer_raw_text(const AnomalyGPT *a, const AnomalyAnswer *ans);
