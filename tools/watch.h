// The hot folder: cameras write image files into a folder; each one is inspected once it is complete.
//
// A file counts as complete when its writer closes it (IN_CLOSE_WRITE) or when it is renamed into the folder
// (IN_MOVED_TO, the safe way to publish a file). Files already there at start are inspected first, in name order.
// Hidden files (".name") and names without a .png/.jpg/.jpeg extension are left alone, so a camera may write
// ".frame.png" or "frame.png.part" and rename it when done. The folder itself is watched, not its subfolders.
//
// Each inspection appends one JSON line to the log (flushed): {"image": path, "ok": ..., the inspection's fields}.
// With sort, an image whose verdict is "normal" moves into DIR/ok/, "anomalous" into DIR/ng/ (a name taken there
// gets "-1", "-2"... before its extension); images without a verdict, or that failed, stay where they are.
#pragma once
#include <cjson/cJSON.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "runtime/status.h"

typedef struct WatchConfig {
    const char *dir;
    const char *log_path;  // NULL: <dir>/inspections.jsonl; "-": stdout
    bool sort;
} WatchConfig;

// Inspects one complete file: returns its JSON object (fields "ok", "verdict"... the watcher adds "image" and
// "moved_to"), which the watcher frees. NULL means the inspection could not be made at all (shutting down).
typedef cJSON *(*WatchInspect)(void *ctx, const char *path);

// Runs until *stop is true (checked at least every 200 ms). Errors: the folder cannot be watched or the log
// cannot be written.
Status watch_folder(const WatchConfig *cfg, WatchInspect inspect, void *ctx, const atomic_bool *stop);
