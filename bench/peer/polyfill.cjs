// PostGraphile 5 declares Node >= 22 and calls Promise.withResolvers (Node 22); on Node 20 every list field
// fails with a masked error without it. Preloaded with `node --require ./polyfill.cjs`.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new this((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}
