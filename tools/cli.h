// The agpt command: one binary, one function per subcommand. Only this layer prints errors and exits.
#pragma once
#include "runtime/status.h"

int cmd_info(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_chat(int argc, char **argv);

// Prints "agpt <cmd>: error: <message>" for a failed status and returns the process exit code (1).
int cli_report(const char *cmd, Status s);
// Value of "--name VALUE" style options; advances *i. Returns NULL (and reports) when the value is missing.
const char *cli_value(int argc, char **argv, int *i, const char *cmd);
