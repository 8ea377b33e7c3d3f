/*
 * A TFLite external delegate plugin for tests. It stands in for accelerator hardware (Edge TPU,
 * GPU) that cannot exist on the test machine, so the runtime's delegate chain can be exercised
 * with a real shared library loaded by the real interpreter.
 *
 * No TFLite headers are available (the wheels ship none), so the few structs the plugin touches
 * are declared here by hand, matching tensorflow/lite/core/c/common.h. Only field prefixes are
 * used; anything past the last field we touch is never read.
 *
 * Behaviour, chosen by the option `mode` or, when absent, by -DLF_DEFAULT_MODE="...":
 *   ok            loads, Prepare returns kTfLiteOk without claiming any node
 *   null          tflite_plugin_create_delegate reports an error and returns NULL (no device)
 *   prepare_error Prepare returns kTfLiteError (the delegate refuses the graph)
 *   wrong         claims every node of the execution plan; its kernel writes a constant pattern
 *                 into the outputs instead of computing them (an accelerator giving wrong answers)
 *   invoke_error  claims every node; its kernel fails at invoke
 * Option `record_to`: a file to which every option received is appended as key=value lines.
 * Option `tensor_stride`: sizeof(TfLiteTensor) of the runtime (default 112, TF 2.14 .. LiteRT 2.3).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef LF_DEFAULT_MODE
#define LF_DEFAULT_MODE "ok"
#endif

typedef enum { kTfLiteOk = 0, kTfLiteError = 1, kTfLiteDelegateError = 2 } TfLiteStatus;

typedef struct {
  int size;
  int data[];
} TfLiteIntArray;

struct TfLiteContext;
struct TfLiteDelegate;

typedef struct TfLiteNode {
  TfLiteIntArray* inputs;
  TfLiteIntArray* outputs;
  TfLiteIntArray* intermediates;
  TfLiteIntArray* temporaries;
  void* user_data;
} TfLiteNode;

typedef struct TfLiteRegistration {
  void* (*init)(struct TfLiteContext* context, const char* buffer, size_t length);
  void (*free)(struct TfLiteContext* context, void* buffer);
  TfLiteStatus (*prepare)(struct TfLiteContext* context, TfLiteNode* node);
  TfLiteStatus (*invoke)(struct TfLiteContext* context, TfLiteNode* node);
  const char* (*profiling_string)(const struct TfLiteContext* context, const TfLiteNode* node);
  int32_t builtin_code;
  const char* custom_name;
  int version;
  void* registration_external;
  void* async_kernel;
  uint64_t inplace_operator;
  /* Zero padding: the struct is passed by value, so a runtime with appended fields reads zeros. */
  void* reserved[8];
} TfLiteRegistration;

typedef struct TfLiteContext {
  size_t tensors_size;
  TfLiteStatus (*GetExecutionPlan)(struct TfLiteContext* context, TfLiteIntArray** execution_plan);
  void* tensors; /* TfLiteTensor*: stride given by the tensor_stride option */
  void* impl_;
  void* ResizeTensor;
  void* ReportError;
  void* AddTensors;
  void* GetNodeAndRegistration;
  TfLiteStatus (*ReplaceNodeSubsetsWithDelegateKernels)(struct TfLiteContext* context,
                                                        TfLiteRegistration registration,
                                                        const TfLiteIntArray* nodes_to_replace,
                                                        struct TfLiteDelegate* delegate);
} TfLiteContext;

typedef struct TfLiteDelegate {
  void* data_;
  TfLiteStatus (*Prepare)(TfLiteContext* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;

typedef struct {
  TfLiteDelegate* delegate;
  TfLiteIntArray* nodes_to_replace;
  TfLiteIntArray* input_tensors;
  TfLiteIntArray* output_tensors;
} TfLiteDelegateParams;

typedef struct {
  char mode[32];
  size_t tensor_stride;
} PluginState;

/* Offsets inside TfLiteTensor (stable since TF 2.0): data.raw at 8, bytes at 40. */
#define TENSOR_DATA_OFFSET 8
#define TENSOR_BYTES_OFFSET 40

static void* kernel_init(TfLiteContext* context, const char* buffer, size_t length) {
  (void)context;
  (void)length;
  const TfLiteDelegateParams* params = (const TfLiteDelegateParams*)buffer;
  return params->delegate->data_;
}

static void kernel_free(TfLiteContext* context, void* buffer) {
  (void)context;
  (void)buffer;
}

static TfLiteStatus kernel_prepare(TfLiteContext* context, TfLiteNode* node) {
  (void)context;
  (void)node;
  return kTfLiteOk;
}

static TfLiteStatus kernel_invoke(TfLiteContext* context, TfLiteNode* node) {
  PluginState* state = (PluginState*)node->user_data;
  if (strcmp(state->mode, "invoke_error") == 0) return kTfLiteError;
  for (int i = 0; i < node->outputs->size; ++i) {
    int index = node->outputs->data[i];
    if (index < 0 || (size_t)index >= context->tensors_size) continue;
    char* tensor = (char*)context->tensors + (size_t)index * state->tensor_stride;
    void* data = *(void**)(tensor + TENSOR_DATA_OFFSET);
    size_t bytes = *(size_t*)(tensor + TENSOR_BYTES_OFFSET);
    if (data != NULL && bytes > 0 && bytes < ((size_t)1 << 30)) memset(data, 0x11, bytes);
  }
  return kTfLiteOk;
}

static TfLiteStatus delegate_prepare(TfLiteContext* context, TfLiteDelegate* delegate) {
  PluginState* state = (PluginState*)delegate->data_;
  if (strcmp(state->mode, "prepare_error") == 0) return kTfLiteError;
  if (strcmp(state->mode, "wrong") != 0 && strcmp(state->mode, "invoke_error") != 0) return kTfLiteOk;
  TfLiteIntArray* plan = NULL;
  if (context->GetExecutionPlan(context, &plan) != kTfLiteOk || plan == NULL) return kTfLiteError;
  TfLiteRegistration registration;
  memset(&registration, 0, sizeof registration);
  registration.init = kernel_init;
  registration.free = kernel_free;
  registration.prepare = kernel_prepare;
  registration.invoke = kernel_invoke;
  registration.builtin_code = 51; /* kTfLiteBuiltinDelegate */
  registration.custom_name = "LitefleetTestDelegate";
  registration.version = 1;
  return context->ReplaceNodeSubsetsWithDelegateKernels(context, registration, plan, delegate);
}

static void record_options(const char* path, char** keys, char** values, size_t n) {
  FILE* f = fopen(path, "a");
  if (f == NULL) return;
  for (size_t i = 0; i < n; ++i) fprintf(f, "%s=%s\n", keys[i], values[i]);
  fclose(f);
}

TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n,
                                              void (*report_error)(const char*)) {
  PluginState* state = (PluginState*)calloc(1, sizeof(PluginState));
  if (state == NULL) return NULL;
  snprintf(state->mode, sizeof state->mode, "%s", LF_DEFAULT_MODE);
  state->tensor_stride = 112;
  for (size_t i = 0; i < n; ++i) {
    if (strcmp(keys[i], "mode") == 0) snprintf(state->mode, sizeof state->mode, "%s", values[i]);
    if (strcmp(keys[i], "tensor_stride") == 0) state->tensor_stride = (size_t)strtoul(values[i], NULL, 10);
    if (strcmp(keys[i], "record_to") == 0) record_options(values[i], keys, values, n);
  }
  if (strcmp(state->mode, "null") == 0) {
    if (report_error != NULL) report_error("test delegate: no accelerator device found");
    free(state);
    return NULL;
  }
  TfLiteDelegate* delegate = (TfLiteDelegate*)calloc(1, sizeof(TfLiteDelegate));
  if (delegate == NULL) {
    free(state);
    return NULL;
  }
  delegate->data_ = state;
  delegate->Prepare = delegate_prepare;
  return delegate;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) {
  if (delegate == NULL) return;
  free(delegate->data_);
  free(delegate);
}
