#include "dist/dp_reducer.hpp"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "core/error.hpp"
#include "backend/backend.hpp"
#include "model/transformer.hpp"

namespace dsrsq::dist {

namespace {

// Layer index of "h.<l>.<...>", or -1 for every other tensor.
std::int64_t layer_of(const std::string& name) {
  if (name.rfind("h.", 0) != 0) return -1;
  const auto dot = name.find('.', 2);
  DSRSQ_REQUIRE(dot != std::string::npos && dot > 2, "parameter name '", name, "' has no layer index");
  return std::stoll(name.substr(2, dot - 2));
}

std::vector<GradSlot> model_slots(Transformer& model) {
  std::vector<GradSlot> slots;
  // Offsets only: device_ptr, since the gradients may live on a device.
  const float* base = model.flat_grads().device_ptr<float>();
  for (const Param& p : model.params())
    slots.push_back(GradSlot{p.name, p.grad.device_ptr<float>() - base, p.grad.numel(), layer_of(p.name)});
  return slots;
}

std::vector<std::int64_t> model_ready_order(const Transformer& model) {
  std::vector<std::int64_t> order;
  for (std::int64_t l = model.config().n_layers - 1; l >= 0; --l) order.push_back(l);
  order.push_back(-1);
  return order;
}

std::span<float> grads_on(const Communicator& comm, Transformer& model) {
  const TensorView g = model.flat_grads();
  DSRSQ_REQUIRE(comm.buffer_device() == g.device, "gradient reducer: the model's gradients live on ",
                device_name(g.device), " but communicator '", comm.name(), "' takes buffers on ",
                device_name(comm.buffer_device()), " (a device run needs a device communicator)");
  return std::span<float>(g.device_ptr<float>(), static_cast<std::size_t>(g.numel()));
}

}  // namespace

GradReducer::GradReducer(Communicator& comm, std::span<float> flat_grads, std::vector<GradSlot> slots,
                         std::vector<std::int64_t> ready_order, ReducerConfig cfg)
    : comm_(comm), grads_(flat_grads), slots_(std::move(slots)), cfg_(cfg) {
  DSRSQ_INPUT_CHECK(cfg_.bucket_cap_bytes > 0 && cfg_.first_bucket_cap_bytes > 0,
                    "gradient buckets: caps must be > 0 bytes, got first ", cfg_.first_bucket_cap_bytes, " and ",
                    cfg_.bucket_cap_bytes);
  build_buckets(ready_order);
}

GradReducer::GradReducer(Communicator& comm, Transformer& model, ReducerConfig cfg)
    : GradReducer(comm, grads_on(comm, model), model_slots(model), model_ready_order(model), cfg) {
  scale_on_ = &model.backend();
}

GradReducer::~GradReducer() { detach(); }

void GradReducer::build_buckets(const std::vector<std::int64_t>& ready_order) {
  // The slots must tile the flat buffer exactly.
  std::vector<std::size_t> by_offset(slots_.size());
  std::iota(by_offset.begin(), by_offset.end(), std::size_t{0});
  std::sort(by_offset.begin(), by_offset.end(), [&](std::size_t a, std::size_t b) { return slots_[a].offset < slots_[b].offset; });
  std::int64_t covered = 0;
  for (std::size_t i : by_offset) {
    DSRSQ_REQUIRE(slots_[i].offset == covered && slots_[i].numel > 0, "gradient slot '", slots_[i].name, "' at offset ",
                  slots_[i].offset, " (", slots_[i].numel, " values) does not continue the tiling at ", covered);
    covered += slots_[i].numel;
  }
  DSRSQ_REQUIRE(covered == static_cast<std::int64_t>(grads_.size()), "gradient slots cover ", covered, " of ",
                grads_.size(), " values");

  for (std::size_t e = 0; e < ready_order.size(); ++e) {
    const bool fresh = event_of_layer_.emplace(ready_order[e], e).second;
    DSRSQ_REQUIRE(fresh, "ready order lists layer ", ready_order[e], " twice");
  }
  for (const auto& s : slots_)
    DSRSQ_REQUIRE(event_of_layer_.count(s.ready_layer), "gradient slot '", s.name, "' is ready after layer ",
                  s.ready_layer, ", which the ready order does not list");

  // Readiness order; within one event, reverse layout order.
  std::vector<std::size_t> order(slots_.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const auto ea = event_of_layer_.at(slots_[a].ready_layer), eb = event_of_layer_.at(slots_[b].ready_layer);
    if (ea != eb) return ea < eb;
    return slots_[a].offset > slots_[b].offset;
  });

  std::vector<std::size_t> bucket_of_slot(slots_.size());
  for (std::size_t i : order) {
    const GradSlot& s = slots_[i];
    const std::size_t bytes = static_cast<std::size_t>(s.numel) * sizeof(float);
    bool start_new = buckets_.empty();
    if (!start_new) {
      GradBucket& cur = buckets_.back();
      const std::size_t cap = buckets_.size() == 1 ? cfg_.first_bucket_cap_bytes : cfg_.bucket_cap_bytes;
      const bool adjacent = s.offset + s.numel == cur.begin || s.offset == cur.end;
      start_new = !adjacent || cur.bytes() + bytes > cap;
    }
    if (start_new) buckets_.push_back(GradBucket{s.offset, s.offset, {}, s.name, s.name});
    GradBucket& b = buckets_.back();
    b.begin = std::min(b.begin, s.offset);
    b.end = std::max(b.end, s.offset + s.numel);
    b.slots.push_back(i);
    b.last = s.name;
    bucket_of_slot[i] = buckets_.size() - 1;
  }

  buckets_of_event_.assign(ready_order.size(), {});
  for (std::size_t i = 0; i < slots_.size(); ++i)
    buckets_of_event_[event_of_layer_.at(slots_[i].ready_layer)].push_back(bucket_of_slot[i]);
  pending_.resize(buckets_.size());
  for (std::size_t b = 0; b < buckets_.size(); ++b) pending_[b] = static_cast<int>(buckets_[b].slots.size());
  requests_.resize(buckets_.size());
  event_seen_.assign(ready_order.size(), false);
}

void GradReducer::attach(Transformer& model) {
  detach();
  DSRSQ_REQUIRE(model.flat_grads().device_ptr<float>() == grads_.data(), "attach: the model's gradient buffer is not the one this reducer was built for");
  model.on_layer_grads_ready = [this](std::int64_t layer) { mark_ready(layer); };
  attached_ = &model;
}

void GradReducer::detach() {
  if (attached_) attached_->on_layer_grads_ready = nullptr;
  attached_ = nullptr;
}

void GradReducer::launch(std::size_t b) {
  GradBucket& bk = buckets_[b];
  std::span<float> x = grads_.subspan(static_cast<std::size_t>(bk.begin), static_cast<std::size_t>(bk.end - bk.begin));
  if (cfg_.reduction == Reduction::average) {
    const float s = 1.0f / static_cast<float>(comm_.size());
    if (comm_.buffer_device() == Device::cpu) {
      for (float& v : x) v *= s;
    } else {  // device memory: the model's backend scales it (stream-ordered before the collective)
      DSRSQ_REQUIRE(scale_on_ != nullptr, "gradient reducer: Reduction::average on device buffers needs the model's "
                    "backend (use the Transformer constructor)");
      scale_on_->scale(TensorView(x.data(), Shape{static_cast<std::int64_t>(x.size())}, DType::f32,
                                  comm_.buffer_device()), s);
    }
  }
  requests_[b] = comm_.iall_reduce_sum(x);
  stats_.buckets_launched += 1;
  stats_.payload_bytes += bk.bytes();
}

void GradReducer::launch_ready() {
  while (next_launch_ < buckets_.size() && pending_[next_launch_] == 0) {
    launch(next_launch_);
    stats_.buckets_launched_during_backward += 1;
    ++next_launch_;
  }
}

void GradReducer::mark_ready(std::int64_t layer) {
  if (!sync_) return;
  const auto it = event_of_layer_.find(layer);
  DSRSQ_REQUIRE(it != event_of_layer_.end(), "gradient-ready hook: unknown layer ", layer);
  const std::size_t e = it->second;
  DSRSQ_REQUIRE(!event_seen_[e], "gradient-ready hook: layer ", layer,
                " marked ready twice in one step (call finish() after each backward, or set_sync(false) while "
                "accumulating)");
  event_seen_[e] = true;
  for (std::size_t b : buckets_of_event_[e]) --pending_[b];
  launch_ready();
  // Open MPI progresses non-blocking collectives only inside MPI calls: poke
  // the buckets in flight so they advance while backward continues.
  for (std::size_t b = 0; b < next_launch_; ++b) requests_[b].test();
}

void GradReducer::finish() {
  if (!sync_) return;
  for (; next_launch_ < buckets_.size(); ++next_launch_) launch(next_launch_);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    try {
      requests_[b].wait();
    } catch (const Error& e) {
      throw Error(detail::cat(e.what(), " [gradient bucket ", b, " of ", buckets_.size(), ": ", buckets_[b].first,
                              " .. ", buckets_[b].last, ", ", buckets_[b].bytes(), " bytes]"));
    }
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.last_wait_seconds = waited;
  stats_.wait_seconds += waited;
  stats_.steps += 1;
  next_launch_ = 0;
  for (std::size_t b = 0; b < buckets_.size(); ++b) pending_[b] = static_cast<int>(buckets_[b].slots.size());
  std::fill(event_seen_.begin(), event_seen_.end(), false);
}

double global_inv_norm(Communicator& dp, std::span<const float> mask) {
  double s = 0;
  for (float m : mask) s += m;
  dp.all_reduce_sum(std::span<double>(&s, 1));
  return s > 0 ? 1.0 / s : 0.0;
}

double all_reduce_scalar(Communicator& comm, double x) {
  comm.all_reduce_sum(std::span<double>(&x, 1));
  return x;
}

}  // namespace dsrsq::dist
