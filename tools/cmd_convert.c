// agpt convert: the official ImageBind, Vicuna, PandaGPT and AnomalyGPT files -> one agpt model file
// (model/convert.h says what goes where).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/convert.h"
#include "runtime/dtype.h"
#include "runtime/text.h"
#include "tools/cli.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt convert [--imagebind F] [--vicuna DIR] [--pandagpt F] [--anomalygpt F] -o OUT.safetensors\n"
            "  --imagebind F     imagebind_huge.pth (vision and text encoders; other modalities are skipped)\n"
            "  --vicuna DIR      the Vicuna-7B v0 HF directory (config.json, pytorch_model-*.bin or *.safetensors\n"
            "                    shards and their index, tokenizer.model)\n"
            "  --pandagpt F      PandaGPT's pytorch_model.pt (LoRA and llama_proj)\n"
            "  --anomalygpt F    an AnomalyGPT checkpoint, e.g. train_mvtec/pytorch_model.pt (decoder, prompt learner)\n"
            "  -o, --out F       the model file to write (written as F.tmp and renamed when complete)\n"
            "  --dtype f16|bf16|f32   storage of the matrices (default f16, as the official weights; vectors stay f32)\n"
            "  --tokenizer F     LLaMA's tokenizer.model to embed (default: <vicuna>/tokenizer.model)\n"
            "  --clip-vocab F    CLIP's bpe_simple_vocab_16e6.txt.gz: embedded, and used to precompute the text\n"
            "                    features of the reference's 30 class names\n"
            "  --class NAME      also precompute this class name's text features (repeatable)\n"
            "  --layers A,B,C,D  vision blocks tapped by the decoder (default: after n/4-1, n/2-1, 3n/4-1, n-1)\n"
            "  --vision-heads N, --text-heads N   attention heads (default: width/80 and width/64, as ImageBind-H)\n"
            "  --lora-alpha A    LoRA alpha (default 32, PandaGPT's; the scaling is alpha / rank)\n"
            "  --no-text-features   skip the class features\n"
            "  --threads N       threads for the text features\n"
            "Any subset of the four inputs converts: --imagebind alone gives a vision-only model; --anomalygpt alone a\n"
            "small file to layer over a converted model with --weights.\n");
}

int cmd_convert(int argc, char **argv) {
    ConvertOptions o = {.dtype = DT_F16};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, "convert"))) return 2; } while (0)
        if (!strcmp(a, "--imagebind")) { VALUE(); o.imagebind = v; }
        else if (!strcmp(a, "--vicuna")) { VALUE(); o.vicuna = v; }
        else if (!strcmp(a, "--pandagpt")) { VALUE(); o.pandagpt = v; }
        else if (!strcmp(a, "--anomalygpt")) { VALUE(); o.anomalygpt = v; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) { VALUE(); o.output = v; }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); o.tokenizer = v; }
        else if (!strcmp(a, "--clip-vocab")) { VALUE(); o.clip_vocab = v; }
        else if (!strcmp(a, "--layers")) { VALUE(); o.taps = v; }
        else if (!strcmp(a, "--no-text-features")) o.no_text_features = true;
        else if (!strcmp(a, "--class")) {
            VALUE();
            if (o.n_classes == CONVERT_MAX_CLASSES) {
                fprintf(stderr, "agpt convert: at most %d --class names\n", CONVERT_MAX_CLASSES);
                return 2;
            }
            if (!v[0] || strlen(v) > 100 || !utf8_valid(v)) {
                fprintf(stderr, "agpt convert: --class names must be 1 to 100 bytes of UTF-8\n");
                return 2;
            }
            o.classes[o.n_classes++] = v;
        } else if (!strcmp(a, "--dtype")) {
            VALUE();
            int d = dtype_from_name(v);
            if (d != DT_F16 && d != DT_BF16 && d != DT_F32) {
                fprintf(stderr, "agpt convert: --dtype f16|bf16|f32\n");
                return 2;
            }
            o.dtype = (DType)d;
        } else if (!strcmp(a, "--vision-heads") || !strcmp(a, "--text-heads") || !strcmp(a, "--threads")) {
            VALUE();
            long long n;
            if (cli_parse_int("convert", a, v, 1, !strcmp(a, "--threads") ? 1024 : 4096, &n)) return 2;
            *(!strcmp(a, "--vision-heads") ? &o.vision_heads : !strcmp(a, "--text-heads") ? &o.text_heads : &o.threads) = (int)n;
        } else if (!strcmp(a, "--lora-alpha")) {
            VALUE();
            double x;
            if (cli_parse_double("convert", a, v, 1e-6, 1e6, &x)) return 2;  // the scaling alpha / rank, > 0
            o.lora_alpha = (float)x;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "agpt convert: unknown argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
#undef VALUE
    }
    if (!o.output || !(o.imagebind || o.vicuna || o.pandagpt || o.anomalygpt)) {
        fprintf(stderr, "agpt convert: -o and at least one of --imagebind, --vicuna, --pandagpt, --anomalygpt\n");
        usage(stderr);
        return 2;
    }
    ConvertReport r;
    Status s = convert_run(&o, &r);
    if (s != AGPT_OK) return cli_report("convert", s);
    fprintf(stderr,
            "agpt convert: wrote %s: %d tensors, %.1f MB, %d class features, %d input tensors skipped, %.1f s\n"
            "agpt convert: peak memory %.1f MB while streaming (buffer %.1f MB; largest input tensor %.1f MB), "
            "%.1f MB at the end%s\n",
            o.output, r.tensors, (double)r.bytes / 1e6, r.classes, r.skipped, r.seconds, (double)r.peak_rss_stream / 1e6,
            (double)r.buffer_bytes / 1e6, (double)r.largest_input_bytes / 1e6, (double)r.peak_rss / 1e6,
            r.classes ? " (the text encoder loaded for the class features)" : "");
    return 0;
}
