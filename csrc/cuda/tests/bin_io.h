// Raw binary and text-parameter file I/O shared by the CUDA host test harnesses
// (test_kernel_math.cpp, emu_driver.cpp); tests/test_cuda_kernels.py writes and reads the files.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

template <typename T>
static std::vector<T> read_bin(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  const std::streamsize n = f.tellg();
  f.seekg(0);
  std::vector<T> v(size_t(n) / sizeof(T));
  f.read(reinterpret_cast<char*>(v.data()), n);
  return v;
}

template <typename T>
static void write_bin(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

static std::vector<double> read_params(const std::string& path) {
  std::ifstream f(path);
  std::vector<double> p;
  double d;
  while (f >> d) p.push_back(d);
  return p;
}
