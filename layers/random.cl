// The counter-based random bits shared by Dropout (layers/neuron.cl) and stochastic pooling (layers/vision.cl);
// layers/neuron.py's dropout_bits computes the same bits with numpy, so CPU and OpenCL draw identically.
// Bits i of a draw with 64-bit seed s: the top 32 bits of splitmix64's output for state s + (i + 1) * golden gamma.
inline uint counter_bits(const ulong seed, const ulong i) {
    ulong z = seed + (i + 1UL) * 0x9E3779B97F4A7C15UL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    z ^= z >> 31;
    return (uint)(z >> 32);
}
