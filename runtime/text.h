// text: making names from untrusted files safe to print in a message.
#pragma once

enum { SHOWN_MAX = 96 };  // bytes a shown() buffer needs

// Copies s into buf for a message: cut to fit (ending "...") and with control bytes replaced by '?', so a
// message stays one readable line however hostile the file. Returns buf.
const char *shown(const char *s, char buf[SHOWN_MAX]);
