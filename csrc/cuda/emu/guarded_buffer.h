// CUDA emulator, part 5: host-side "device" buffers with poisoned guard zones.
//
// GuardedBuffer<T> plays the role of a cudaMalloc'ed array in emulator tests. The n elements are
// surrounded by 4 KiB guard zones filled with a poison value (a quiet NaN with a recognizable
// payload for float/double/__half/__nv_bfloat16, 0xFF bytes for everything else):
//   * an out-of-bounds READ of index -1, n, n+1, ... returns NaN and poisons the result;
//   * an out-of-bounds WRITE changes guard bytes, which check() (and, by default, every
//     emu::launch, see Config::check_guards_after_launch) reports with the element offsets.
// The elements themselves start poisoned too (like uninitialized device memory), unless the buffer
// is constructed from a vector. data() is 256-byte aligned, like cudaMalloc.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "emu_runtime.h"

namespace emu {

template <class T>
inline T poison_value() {
  T v;
  if (std::is_same<T, float>::value) {
    const uint32_t bits = 0x7FFBAD5Bu;
    std::memcpy(&v, &bits, sizeof(bits));
  } else if (std::is_same<T, double>::value) {
    const uint64_t bits = 0x7FFBAD5BAD5BAD5Bull;
    std::memcpy(&v, &bits, sizeof(bits));
  } else if (std::is_same<T, __half>::value) {
    const uint16_t bits = 0x7E5B;
    std::memcpy(&v, &bits, sizeof(bits));
  } else if (std::is_same<T, __nv_bfloat16>::value) {
    const uint16_t bits = 0x7FDB;
    std::memcpy(&v, &bits, sizeof(bits));
  } else {
    std::memset(&v, 0xFF, sizeof(T));
  }
  return v;
}

template <class T>
class GuardedBuffer final : public detail::GuardCheckable {
  static_assert(std::is_trivially_copyable<T>::value,
                "GuardedBuffer holds trivially copyable elements");

 public:
  static constexpr size_t kGuardBytes = 4096;

  explicit GuardedBuffer(size_t n, std::string name = "buffer") : n_(n), name_(std::move(name)) {
    // The front guard is a multiple of 256 bytes so data() keeps cudaMalloc's alignment; whole
    // poison elements sit right before data() and right after the last element.
    front_bytes_ = detail::align_up(std::max(kGuardBytes, sizeof(T)), 256);
    back_bytes_ = std::max(kGuardBytes, sizeof(T));
    const size_t total = detail::align_up(front_bytes_ + n_ * sizeof(T) + back_bytes_, 256);
    base_ = static_cast<unsigned char*>(std::aligned_alloc(256, total));
    if (base_ == nullptr) throw Error("GuardedBuffer '" + name_ + "': out of memory");
    front_image_ = guard_image(front_bytes_, /*elements_at_end=*/true);
    back_image_ = guard_image(back_bytes_, /*elements_at_end=*/false);
    restore_guards();
    const T poison = poison_value<T>();
    for (size_t i = 0; i < n_; ++i) data()[i] = poison;
    std::lock_guard<std::mutex> lk(detail::guard_registry_mutex());
    detail::guard_registry().push_back(this);
  }

  GuardedBuffer(const std::vector<T>& values, std::string name = "buffer")
      : GuardedBuffer(values.size(), std::move(name)) {
    if (!values.empty()) std::memcpy(data(), values.data(), values.size() * sizeof(T));
  }

  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;

  ~GuardedBuffer() {
    {
      std::lock_guard<std::mutex> lk(detail::guard_registry_mutex());
      auto& r = detail::guard_registry();
      r.erase(std::remove(r.begin(), r.end(), static_cast<detail::GuardCheckable*>(this)), r.end());
    }
    std::free(base_);
  }

  T* data() { return reinterpret_cast<T*>(base_ + front_bytes_); }
  const T* data() const { return reinterpret_cast<const T*>(base_ + front_bytes_); }
  size_t size() const { return n_; }
  const std::string& name() const { return name_; }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }
  std::vector<T> to_vector() const { return std::vector<T>(data(), data() + n_); }
  void fill(const T& v) { std::fill(data(), data() + n_, v); }

  // Empty if both guard zones are intact; otherwise a description of the damage.
  std::string guard_violations() const override {
    std::string r;
    const unsigned char* front = base_;
    const unsigned char* back = base_ + front_bytes_ + n_ * sizeof(T);
    r += describe_damage(front, front_image_, -static_cast<long long>(front_bytes_),
                         "before the start");
    const std::string after =
        describe_damage(back, back_image_, static_cast<long long>(n_ * sizeof(T)), "after the end");
    if (!r.empty() && !after.empty()) r += "; ";
    r += after;
    if (r.empty()) return r;
    return detail::strprintf(
               "GuardedBuffer '%s' (%zu elements of %zu bytes): out-of-bounds write: ",
               name_.c_str(), n_, sizeof(T)) +
           r;
  }

  // Throws emu::Error describing any out-of-bounds write.
  void check() const {
    const std::string v = guard_violations();
    if (!v.empty()) throw Error(v);
  }

  void restore_guards() override {
    std::memcpy(base_, front_image_.data(), front_bytes_);
    std::memcpy(base_ + front_bytes_ + n_ * sizeof(T), back_image_.data(), back_bytes_);
  }

 private:
  size_t n_;
  std::string name_;
  size_t front_bytes_ = 0, back_bytes_ = 0;
  unsigned char* base_ = nullptr;
  std::vector<unsigned char> front_image_, back_image_;

  // Whole poison elements adjacent to the data, 0xFF in any leftover bytes at the far end.
  static std::vector<unsigned char> guard_image(size_t bytes, bool elements_at_end) {
    std::vector<unsigned char> image(bytes, 0xFF);
    const T poison = poison_value<T>();
    const size_t count = bytes / sizeof(T);
    const size_t first = elements_at_end ? bytes - count * sizeof(T) : 0;
    for (size_t i = 0; i < count; ++i)
      std::memcpy(&image[first + i * sizeof(T)], &poison, sizeof(T));
    return image;
  }

  // `origin` is the byte offset of the zone relative to data().
  static std::string describe_damage(const unsigned char* zone,
                                     const std::vector<unsigned char>& image, long long origin,
                                     const char* where) {
    size_t count = 0, first = 0, last = 0;
    for (size_t i = 0; i < image.size(); ++i) {
      if (zone[i] != image[i]) {
        if (count++ == 0) first = i;
        last = i;
      }
    }
    if (count == 0) return "";
    const long long size = static_cast<long long>(sizeof(T));
    auto element = [&](size_t i) {  // floor division: byte -1 belongs to element -1
      const long long b = origin + static_cast<long long>(i);
      return b >= 0 ? b / size : -((-b + size - 1) / size);
    };
    return detail::strprintf("%zu guard byte(s) modified %s (element indices %lld to %lld)", count,
                             where, element(first), element(last));
  }
};

}  // namespace emu
