// Helpers shared by the emulator test programs (host side only).
#pragma once

#include <cstdio>
#include <cstring>
#include <string>

#include "cuda/emu/launch.h"

// Runs `fn` and reports how it ended, for the Python test to match: "<label>: CAUGHT <message>"
// for an emu::Error, "<label>: NO ERROR" otherwise.
template <class F>
void report_error(const char* label, F fn) {
  try {
    fn();
    std::printf("%s: NO ERROR\n", label);
  } catch (const emu::Error& e) {
    std::printf("%s: CAUGHT %s\n", label, e.what());
  }
  std::fflush(stdout);
}

inline bool mode_is(int argc, char** argv, const char* mode) {
  return argc > 1 && std::strcmp(argv[1], mode) == 0;
}
