"""Numba kernels of BING: normed gradients, 8x8 filter responses (binarized and float) and window selection.

Everything compiles lazily on first call and is cached on disk (``cache=True``), so importing this module
costs nothing. The binarized response follows Cheng et al. (CVPR 2014, Alg. 2): the top ``num_bits`` bit
planes of the gradient map are kept as 64-bit words per window (``(T << 8) | row_byte``), and a filter
approximated by ``sum_j c_j a_j`` with ``a_j`` in ``{-1, +1}^64`` scores a window with popcounts:
``<a_j, g> = 2 * popcount(b_j & g) - popcount(g)`` per bit plane. Bit ``63 - k`` of a word is the pixel
``k = 8 * dy + dx`` of the window (row-major), as in OpenCV.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.extending import intrinsic

_JIT = {"cache": True, "nogil": True}


@intrinsic
def _popcount(typingctx, x):
    """``popcount`` of an integer (LLVM ``ctpop``, one POPCNT instruction on x86-64)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


# Byte ``b`` of SPREAD[v] holds bit ``b`` of ``v``: lets one shift update eight 8-pixel row windows at once.
SPREAD = np.array([sum(((v >> b) & 1) << (8 * b) for b in range(8)) for v in range(256)], dtype=np.uint64)


@nb.njit(**_JIT)
def halve(src, dst, acc, pairs):
    """Box-filtered 2x reduction: ``dst`` (uint8 ``[h, w, c]``) is ``src`` averaged over pairs along each axis
    where ``dst`` is shorter (about half), copied along an axis of equal length. Indices past the end of
    ``src`` are clamped, so odd lengths work. ``acc`` and ``pairs`` are uint16 scratch rows of ``(w + 1) * c``."""
    sh, sw, c = src.shape
    dh, dw, _ = dst.shape
    n = sw * c
    for y in range(dh):
        if dh != sh:
            a = src[min(2 * y, sh - 1)].reshape(n)
            b = src[min(2 * y + 1, sh - 1)].reshape(n)
            for k in range(n):
                acc[k] = np.uint16(a[k]) + np.uint16(b[k])
        else:
            a = src[y].reshape(n)
            for k in range(n):
                acc[k] = np.uint16(a[k]) << 1
        out = dst[y].reshape(dw * c)
        if dw == sw:
            for k in range(n):
                out[k] = (acc[k] + 1) >> 1
            continue
        for k in range(c):
            acc[n + k] = acc[n - c + k]  # clamp: a missing right neighbour repeats the last pixel
        nxt = acc[c : n + c]
        for k in range(n):
            pairs[k] = acc[k] + nxt[k] + 2
        if c == 3:
            for x in range(dw):
                out[3 * x] = pairs[6 * x] >> 2
                out[3 * x + 1] = pairs[6 * x + 1] >> 2
                out[3 * x + 2] = pairs[6 * x + 2] >> 2
        else:
            for x in range(dw):
                out[x] = pairs[2 * x] >> 2


@nb.njit(**_JIT)
def build_pyramid(pixels, offsets, map_h, map_w, nch, order, parent):
    """Fills every map whose ``parent`` is set by halving its parent, in ``order`` (maps without a parent must be
    filled before). Maps are uint8 ``[map_h[i], map_w[i], nch]`` at ``offsets[i]`` of ``pixels``."""
    widest = 0
    for i in range(map_w.shape[0]):
        widest = max(widest, np.int64(map_w[i]))
    acc = np.empty((widest + 1) * nch, np.uint16)
    pairs = np.empty((widest + 1) * nch, np.uint16)
    for i in order:
        p = parent[i]
        if p < 0:
            continue
        src = pixels[offsets[p] : offsets[p + 1]].reshape((np.int64(map_h[p]), np.int64(map_w[p]), nch))
        dst = pixels[offsets[i] : offsets[i + 1]].reshape((np.int64(map_h[i]), np.int64(map_w[i]), nch))
        halve(src, dst, acc, pairs)


# Numba hot loops below avoid integer division and ``a[i - k]`` indexing (signed offsets need wraparound checks);
# both stop LLVM from vectorizing. Shifted operands are passed as slices instead.


@nb.njit(**_JIT)
def _absdiff(p, q, out):
    for k in range(out.shape[0]):
        u = p[k]
        v = q[k]
        out[k] = u - v if u > v else v - u


@nb.njit(**_JIT)
def _combine_channels(d, nch, summed, out):
    """``out[i]`` = max (or sum) of the ``nch`` channel differences ``d[nch * i : nch * i + nch]``."""
    n = out.shape[0]
    if nch == 1:
        for i in range(n):
            out[i] = d[i]
    elif summed:
        for i in range(n):
            out[i] = np.int32(d[3 * i]) + np.int32(d[3 * i + 1]) + np.int32(d[3 * i + 2])
    else:
        for i in range(n):
            a = d[3 * i]
            b = d[3 * i + 1]
            c = d[3 * i + 2]
            m = a if a > b else b
            out[i] = m if m > c else c


@nb.njit(**_JIT)
def normed_gradient(img, summed, mag):
    """Writes ``min(|gx| + |gy|, 255)`` of ``img`` (uint8 ``[h, w, c]``, c in {1, 3}, h and w >= 2) into ``mag``.

    Central differences, combined over channels by max (``summed=False``: OpenCV's MAXBGR and gray rule;
    one-sided differences at the border count twice) or by sum (``summed=True``: OpenCV's HSV rule; central
    differences count half, one-sided ones once).
    """
    h, w, nch = img.shape
    n = w * nch
    flat = img.reshape((h, n))
    d = np.empty(n, np.uint8)
    gx = np.empty(w, np.int32)
    gy = np.empty(w, np.int32)
    half = 1 if summed else 0
    edge = 1 if summed else 2
    for y in range(h):
        row = flat[y]
        _absdiff(row[2 * nch :], row[: n - 2 * nch], d)
        inner = gx[1 : w - 1]
        _combine_channels(d, nch, summed, inner)
        for x in range(w - 2):
            inner[x] >>= half
        _absdiff(row[nch : 2 * nch], row[:nch], d)
        _combine_channels(d, nch, summed, gx[:1])
        _absdiff(row[n - nch :], row[n - 2 * nch : n - nch], d)
        _combine_channels(d, nch, summed, gx[w - 1 :])
        gx[0] *= edge
        gx[w - 1] *= edge
        if y == 0 or y == h - 1:
            lo = 0 if y == 0 else h - 2
            _absdiff(flat[lo + 1], flat[lo], d)
            _combine_channels(d, nch, summed, gy)
            for x in range(w):
                gy[x] *= edge
        else:
            _absdiff(flat[y + 1], flat[y - 1], d)
            _combine_channels(d, nch, summed, gy)
            for x in range(w):
                gy[x] >>= half
        m = mag[y]
        for x in range(w):
            m[x] = min(gx[x] + gy[x], 255)


@nb.njit(**_JIT)
def score_binary_2x4(mag, b0, b1, c0, c1, out):
    """Binarized response with two basis vectors and the top four bit planes (the paper's defaults).

    Same result as :func:`score_binary` with ``num_bits=4``, organised for the vectorizer: the four 8-pixel
    row bytes of every pixel are built at once in a uint32 (byte ``p`` for bit plane ``4 + p``) with whole-row
    array operations instead of a running register.
    """
    h, w = mag.shape
    planes = np.zeros((4, w), np.uint64)
    spread = np.zeros(w + 7, np.uint32)  # seven leading zeros: row bytes start empty at the left border
    row_bytes = np.empty(w, np.uint32)
    k0 = np.float32(c0 * 16.0)
    k1 = np.float32(c1 * 16.0)
    s8 = np.uint64(8)
    m8 = np.uint32(0xFF)
    t0, t1, t2, t3 = planes[0], planes[1], planes[2], planes[3]
    for y in range(h):
        row = mag[y]
        bits = spread[7:]
        for x in range(w):
            q = np.uint32(row[x] >> 4)
            bits[x] = (q & 1) | ((q & 2) << 7) | ((q & 4) << 14) | ((q & 8) << 21)
        # Bit k of a row byte is the pixel k places to the left (OpenCV's order).
        for x in range(w):
            row_bytes[x] = (
                spread[x + 7]
                | (spread[x + 6] << 1)
                | (spread[x + 5] << 2)
                | (spread[x + 4] << 3)
                | (spread[x + 3] << 4)
                | (spread[x + 2] << 5)
                | (spread[x + 1] << 6)
                | (spread[x] << 7)
            )
        for x in range(w):
            r = row_bytes[x]
            t0[x] = (t0[x] << s8) | np.uint64(r & m8)
            t1[x] = (t1[x] << s8) | np.uint64((r >> 8) & m8)
            t2[x] = (t2[x] << s8) | np.uint64((r >> 16) & m8)
            t3[x] = (t3[x] << s8) | np.uint64(r >> 24)
        if y < 7:
            continue
        orow = out[y - 7]
        v0, v1, v2, v3 = t0[7:], t1[7:], t2[7:], t3[7:]
        for x in range(w - 7):
            u0, u1, u2, u3 = v0[x], v1[x], v2[x], v3[x]
            tot = (
                np.int32(_popcount(u0))
                + (np.int32(_popcount(u1)) << 1)
                + (np.int32(_popcount(u2)) << 2)
                + (np.int32(_popcount(u3)) << 3)
            )
            a0 = (
                np.int32(_popcount(u0 & b0))
                + (np.int32(_popcount(u1 & b0)) << 1)
                + (np.int32(_popcount(u2 & b0)) << 2)
                + (np.int32(_popcount(u3 & b0)) << 3)
            )
            a1 = (
                np.int32(_popcount(u0 & b1))
                + (np.int32(_popcount(u1 & b1)) << 1)
                + (np.int32(_popcount(u2 & b1)) << 2)
                + (np.int32(_popcount(u3 & b1)) << 3)
            )
            orow[x] = k0 * np.float32(2 * a0 - tot) + k1 * np.float32(2 * a1 - tot)


@nb.njit(**_JIT)
def score_binary(mag, bases, coeffs, num_bits, out):
    """Binarized 8x8 response of ``mag`` (uint8 ``[h, w]``) into ``out`` (float32 ``[h - 7, w - 7]``).

    ``bases``: uint64 ``[nw]`` (1 <= nw <= 4) basis vectors, ``coeffs``: their float32 weights, ``num_bits``:
    how many of the top bit planes of the gradient are kept (1..8). Scores are in the units of the float
    response ``sum(w * g)`` with ``g`` in ``[0, 255]``.
    """
    h, w = mag.shape
    nw = bases.shape[0]
    lo = 8 - num_bits
    planes = np.zeros((w, 8), np.uint64)
    b = np.zeros(4, np.uint64)
    c = np.zeros(4, np.float32)
    for j in range(nw):
        b[j] = bases[j]
        c[j] = coeffs[j]
    keep = np.uint64(0xFEFEFEFEFEFEFEFE)
    m8 = np.uint64(0xFF)
    for y in range(h):
        row = mag[y]
        r = np.uint64(0)
        for x in range(w):
            r = ((r << np.uint64(1)) & keep) | SPREAD[row[x]]
            for p in range(8):
                planes[x, p] = (planes[x, p] << np.uint64(8)) | ((r >> np.uint64(8 * p)) & m8)
        if y < 7:
            continue
        orow = out[y - 7]
        for x in range(w - 7):
            tot = np.int32(0)
            a0 = np.int32(0)
            a1 = np.int32(0)
            a2 = np.int32(0)
            a3 = np.int32(0)
            for p in range(lo, 8):
                t = planes[x + 7, p]
                tot += np.int32(_popcount(t)) << p
                a0 += np.int32(_popcount(t & b[0])) << p
                a1 += np.int32(_popcount(t & b[1])) << p
                a2 += np.int32(_popcount(t & b[2])) << p
                a3 += np.int32(_popcount(t & b[3])) << p
            orow[x] = (
                c[0] * np.float32(2 * a0 - tot)
                + c[1] * np.float32(2 * a1 - tot)
                + c[2] * np.float32(2 * a2 - tot)
                + c[3] * np.float32(2 * a3 - tot)
            )


@nb.njit(fastmath=True, **_JIT)
def score_float(mag, weights, out):
    """Exact float 8x8 correlation ``out[y, x] = sum(weights * mag[y:y + 8, x:x + 8])``."""
    h, w = mag.shape
    ow = w - 7
    row = np.empty(w, np.float32)
    for y in range(h - 7):
        orow = out[y]
        orow[:] = 0.0
        for dy in range(8):
            src = mag[y + dy]
            for x in range(w):
                row[x] = np.float32(src[x])
            for dx in range(8):
                wv = weights[dy, dx]
                shifted = row[dx : dx + ow]
                for x in range(ow):
                    orow[x] += wv * shifted[x]


@nb.njit(**_JIT)
def _max3(a, b, c, out):
    for i in range(out.shape[0]):
        m = a[i] if a[i] > b[i] else b[i]
        out[i] = m if m > c[i] else c[i]


@nb.njit(**_JIT)
def _append(src, start, stop, base, size_id, slope, intercept, flag, ids, pos, val, raw, k):
    for x in range(start, stop):
        if flag[x]:
            v = src[x]
            ids[k] = size_id
            pos[k] = base + x
            raw[k] = v
            val[k] = slope * v + intercept
            k += 1
    return k


@nb.njit(**_JIT)
def _collect_maxima(s, slope, intercept, size_id, all_positions, hmax, ids, pos, val, raw, k):
    """Appends the windows of response map ``s`` (``[h, w]``) at index ``k`` of the output arrays; returns the new
    count. Without ``all_positions`` only local maxima: at least their later neighbours (raster order) and
    above their earlier ones, so that a plateau yields no two adjacent windows. ``hmax``: float32 scratch of
    at least ``(h + 2) * w``."""
    h, w = s.shape
    flag = np.ones(w, np.bool_)
    if all_positions:
        for y in range(h):
            k = _append(s[y], 0, w, y * w, size_id, slope, intercept, flag, ids, pos, val, raw, k)
        return k
    # m[y + 1] is the max of s[y] over each window's row neighbourhood; m[0] and m[h + 1] are -inf borders.
    m = hmax[: (h + 2) * w].reshape((h + 2, w))
    m[0, :] = -np.inf
    m[h + 1, :] = -np.inf
    for y in range(h):
        src, dst = s[y], m[y + 1]
        if w == 1:
            dst[0] = src[0]
            continue
        _max3(src[: w - 2], src[1 : w - 1], src[2:], dst[1 : w - 1])
        dst[0] = max(src[0], src[1])
        dst[w - 1] = max(src[w - 2], src[w - 1])
    for y in range(h):
        src, up, down = s[y], m[y], m[y + 2]
        if w == 1:
            flag[0] = (src[0] > up[0]) & (src[0] >= down[0])
        else:
            centre, left, right = src[1 : w - 1], src[: w - 2], src[2:]
            u, d, f = up[1 : w - 1], down[1 : w - 1], flag[1 : w - 1]
            for x in range(w - 2):
                v = centre[x]
                f[x] = (v > u[x]) & (v > left[x]) & (v >= right[x]) & (v >= d[x])
            flag[0] = (src[0] > up[0]) & (src[0] >= src[1]) & (src[0] >= down[0])
            flag[w - 1] = (src[w - 1] > up[w - 1]) & (src[w - 1] > src[w - 2]) & (src[w - 1] >= down[w - 1])
        k = _append(src, 0, w, y * w, size_id, slope, intercept, flag, ids, pos, val, raw, k)
    return k


def workspace_sizes(map_h: np.ndarray, map_w: np.ndarray, all_positions: bool) -> tuple[int, int, int]:
    """``(candidate capacity, largest map, largest response map plus two rows)`` that :func:`score_windows` needs."""
    h = map_h.astype(np.int64)
    w = map_w.astype(np.int64)
    rh, rw = h - 7, w - 7
    # Local maxima are never adjacent, so there is at most one per 2x2 block.
    cap = int((rh * rw).sum()) if all_positions else int((((rh + 1) // 2) * ((rw + 1) // 2)).sum())
    return cap, int((h * w).max(initial=0)), int(((rh + 2) * rw).max(initial=0))


@nb.njit(**_JIT)
def score_windows(
    pixels,
    pixel_offsets,
    map_h,
    map_w,
    nch,
    summed,
    bases,
    coeffs,
    num_bits,
    weights,
    binarized,
    slope,
    intercept,
    size_ids,
    all_positions,
    mag_buf,
    res_buf,
    hmax,
    ids,
    pos,
    val,
    raw,
):
    """Scores the windows of every size with one filter and keeps the local maxima of each response map.

    ``pixels`` holds the image resized for size ``i`` (uint8 ``[map_h[i], map_w[i], nch]`` at
    ``pixel_offsets[i]``). A window's calibrated score is ``slope[i] * response + intercept[i]``. The caller
    passes the scratch buffers and outputs (sized by :func:`workspace_sizes`) so that repeated calls reuse
    memory: fresh pages are expensive (page faults), far more than this kernel's arithmetic.

    Returns:
        ``k``: the kept windows are ``ids[:k]`` (size id), ``pos[:k]`` (flat position in the response map),
        ``val[:k]`` (calibrated score) and ``raw[:k]`` (response).
    """
    fast = binarized and bases.shape[0] == 2 and num_bits == 4
    nch = np.int64(nch)
    k = 0
    for i in range(map_h.shape[0]):
        h, w = np.int64(map_h[i]), np.int64(map_w[i])
        img = pixels[pixel_offsets[i] : pixel_offsets[i] + h * w * nch].reshape((h, w, nch))
        mag = mag_buf[: h * w].reshape((h, w))
        normed_gradient(img, summed, mag)
        res = res_buf[: (h - 7) * (w - 7)].reshape((h - 7, w - 7))
        if fast:
            score_binary_2x4(mag, bases[0], bases[1], coeffs[0], coeffs[1], res)
        elif binarized:
            score_binary(mag, bases, coeffs, num_bits, res)
        else:
            score_float(mag, weights, res)
        k = _collect_maxima(res, slope[i], intercept[i], size_ids[i], all_positions, hmax, ids, pos, val, raw, k)
    return k


@nb.njit(**_JIT)
def _top_bins(val, idx, count):
    """Mask over ``idx``: the values in the highest bins of a 1024-bin histogram that together hold at least
    ``count`` of ``val[idx]`` (a cut without sorting)."""
    lo, hi = np.inf, -np.inf
    for i in idx:
        lo = min(lo, val[i])
        hi = max(hi, val[i])
    bins = 1024
    scale = (bins - 1) / (hi - lo) if hi > lo else 0.0
    hist = np.zeros(bins, np.int64)
    which = np.empty(idx.shape[0], np.int64)
    for j in range(idx.shape[0]):
        which[j] = int((val[idx[j]] - lo) * scale)
        hist[which[j]] += 1
    total, cut = 0, bins - 1
    while cut > 0 and total + hist[cut] < count:
        total += hist[cut]
        cut -= 1
    return which >= cut


@nb.njit(**_JIT)
def select_windows(ids, pos, val, res_h, res_w, topk, nss, per_size, taken):
    """Greedy selection, best calibrated score first: a window is taken unless a taken window of the same size
    lies within ``nss`` map cells (Chebyshev distance) or its size already has ``per_size`` windows.

    ``res_h``/``res_w`` are indexed by size id; ``taken`` is a uint8 scratch buffer of at least
    ``sum(res_h * res_w)`` cells. Returns the indices of the chosen candidates, best first.
    """
    n = val.shape[0]
    chosen = np.empty(min(topk, n), np.int64)
    if n == 0 or topk <= 0:
        return chosen[:0]
    nsizes = res_h.shape[0]
    mask_off = np.zeros(nsizes + 1, np.int64)
    for i in range(nsizes):
        mask_off[i + 1] = mask_off[i] + res_h[i] * res_w[i]
    taken[: mask_off[-1]] = 0
    counts = np.zeros(nsizes, np.int64)
    k = 0
    # Sort only the best chunk of candidates (about 2 * topk, cut at a histogram bin); most calls finish inside
    # the first chunk, the next chunks are 4 times larger.
    chunk = max(2 * topk, 256)
    remaining = np.arange(n)
    while k < topk and remaining.shape[0] > 0:
        if remaining.shape[0] > chunk:
            keep = _top_bins(val, remaining, chunk)
            head, remaining = remaining[keep], remaining[~keep]
        else:
            head, remaining = remaining, remaining[:0]
        # Ties go to the later raster position, as in OpenCV's std::sort of (value, index) pairs, descending.
        head = head[np.argsort(-pos[head], kind="mergesort")]
        for idx in head[np.argsort(-val[head], kind="mergesort")]:
            sid = ids[idx]
            if per_size > 0 and counts[sid] >= per_size:
                continue
            w = res_w[sid]
            p = pos[idx]
            base = mask_off[sid]
            if taken[base + p]:
                continue
            chosen[k] = idx
            k += 1
            counts[sid] += 1
            y, x = p // w, p % w
            for yy in range(max(y - nss, 0), min(y + nss, res_h[sid] - 1) + 1):
                for xx in range(max(x - nss, 0), min(x + nss, w - 1) + 1):
                    taken[base + yy * w + xx] = 1
            if k >= topk:
                break
        chunk *= 4
    return chosen[:k]
